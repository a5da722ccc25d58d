"""What the paper experiments rely on beyond the metrics: mBART language codes in training targets and generation,
the teacher-forced `loss` metric, label smoothing, MAM budget shares and per-method settings (by_method)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, BartConfig, MBart50Tokenizer, MBartConfig, MBartTokenizer, RobertaConfig

from numerics import assert_close_scaled, assert_same
from unipelt import load_method
from unipelt.app.by_method import apply_by_method
from unipelt.budget import solve
from unipelt.errors import DataError, MethodConfigError, UnipeltError
from unipelt.spec import preset_dir
from unipelt.tasks import prepare_task
from unipelt.tasks.losses import token_cross_entropy
from unipelt.train import TrainConfig

PAIRS = [("the cat sat on the mat", "pisica sta pe pres"), ("the dog is big", "cainele este mare"),
         ("a small house", "o casa mica"), ("the cat is small", "pisica este mica")]


def _words() -> list[str]:
    return sorted({w for pair in PAIRS for text in pair for w in text.split()})


def mbart_tokenizer(family: str = "mbart"):
    """A tiny unigram vocabulary of the fixture's words with mBART's specials and language codes."""
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in _words()]
    return MBartTokenizer(vocab=pieces) if family == "mbart" else MBart50Tokenizer(vocab=pieces)


def tiny_mbart(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = MBartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         decoder_start_token_id=2, forced_eos_token_id=None)
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def write_pairs(directory) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for en, ro in PAIRS:
                handle.write(json.dumps({"translation": {"en": en, "ro": ro}}) + "\n")
    return str(directory)


def en_ro_task(data_dir: str, **changes) -> dict:
    return {"name": "en_ro_tiny", "kind": "translation", "data_dir": data_dir, "text_columns": ["en", "ro"],
            "translation_column": "translation", "metrics": ["bleu", "bleu_ro_moses", "loss"],
            "source_lang": "en_XX", "target_lang": "ro_RO", "num_beams": 2, "max_new_tokens": 6, **changes}


def test_mbart_targets_end_in_the_target_code_and_generation_starts_from_it(tmp_path):
    tokenizer = mbart_tokenizer()
    en, ro = tokenizer.convert_tokens_to_ids("en_XX"), tokenizer.convert_tokens_to_ids("ro_RO")
    task = prepare_task(en_ro_task(write_pairs(tmp_path / "data")), tokenizer, model_type="mbart")
    assert task.language_start == {"decoder_start_token_id": ro}
    example = task.eval_splits["validation"][0]
    assert example["input_ids"][-2:] == [tokenizer.eos_token_id, en]  # source: tokens </s> en_XX
    assert example["labels"][-2:] == [tokenizer.eos_token_id, ro]  # target: tokens </s> ro_RO
    assert tokenizer.src_lang == "en_XX" and tokenizer.tgt_lang is None  # the caller's tokenizer is untouched

    model = tiny_mbart(len(tokenizer))
    batch = task.collate([task.eval_splits["validation"][i] for i in range(4)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        started = model.generate(**inputs, **task.generation_kwargs())
        plain = model.generate(**inputs, **{k: v for k, v in task.generation_kwargs().items()
                                            if k != "decoder_start_token_id"})
    assert (started[:, 0] == ro).all()  # the decoder starts in Romanian, as training showed it
    assert (plain[:, 0] != ro).all()  # without the code the model starts from its config's start token
    metrics = task.evaluate(model, "validation", batch_size=2)
    assert set(metrics) == {"bleu", "bleu_ro_moses", "loss"} and all(v == v for v in metrics.values())


def test_mbart50_style_tokenizers_force_the_code_as_the_first_generated_token(tmp_path):
    tokenizer = mbart_tokenizer("mbart50")
    ro = tokenizer.convert_tokens_to_ids("ro_RO")
    task = prepare_task(en_ro_task(write_pairs(tmp_path / "data")), tokenizer, model_type="mbart")
    assert task.language_start == {"forced_bos_token_id": ro}
    assert task.eval_splits["validation"][0]["labels"][0] == ro  # target: ro_RO tokens </s>
    model = tiny_mbart(len(tokenizer))
    batch = task.collate([task.eval_splits["validation"][0]])
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             **task.generation_kwargs())
    assert out[0, 0].item() == model.config.decoder_start_token_id and out[0, 1].item() == ro


def test_unknown_language_code_is_named(tmp_path):
    with pytest.raises(DataError, match="target_lang 'xx_YY'"):
        prepare_task(en_ro_task(write_pairs(tmp_path / "data"), target_lang="xx_YY"), mbart_tokenizer(),
                     model_type="mbart")


def test_loss_metric_is_the_token_weighted_reference_cross_entropy(tmp_path):
    tokenizer = mbart_tokenizer()
    task = prepare_task(en_ro_task(write_pairs(tmp_path / "data"), metrics=["loss"]), tokenizer, model_type="mbart")
    model = tiny_mbart(len(tokenizer), seed=1)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for feature in task.eval_splits["validation"]:  # one example at a time: transformers' own mean loss
            batch = {k: torch.tensor([v]) for k, v in feature.items()}
            n = len(feature["labels"])
            total += model(**batch).loss.item() * n
            tokens += n
    # batches of 3 padded examples against one at a time: every matmul of the 4 layers (at most 12 a layer: self and
    # cross attention, FFN) over other shapes, the LM head, the log-softmax and the token-weighted mean
    layers = model.config.encoder_layers + model.config.decoder_layers
    assert_close_scaled(task.evaluate(model, "validation", batch_size=3)["loss"], total / tokens, ops=12 * layers + 3,
                        dtype=torch.float32, reason="the whole forward over other batch shapes, and the loss's mean")
    assert not task.greater_is_better and task.main_metric == "loss"


def test_label_smoothing_is_transformers_formula():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, -100]])
    keep = labels != -100
    logp = torch.log_softmax(logits, -1)[keep]
    nll = -logp.gather(-1, labels[keep].unsqueeze(-1)).mean()
    uniform = -logp.mean(-1).mean()  # transformers' LabelSmoother: the mean over the vocabulary of -log p
    expected = 0.9 * nll + 0.1 * uniform
    # F.cross_entropy's fused log-softmax, smoothing and mean against them written out
    assert_close_scaled(token_cross_entropy(logits, labels, 0.1), expected, ops=3,
                        reason="log-softmax, the 0.9 / 0.1 mix and the means, fused vs written out")
    assert_close_scaled(token_cross_entropy(logits, labels), nll, ops=2,
                        reason="log-softmax and the mean over kept tokens, fused vs written out")
    causal = token_cross_entropy(logits, labels, 0.0, causal=True)  # position t predicts label t + 1
    shifted = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert_same(causal, shifted)  # the same F.cross_entropy call on the same shifted values


BART_LARGE = BartConfig(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=50265)
ROBERTA_BASE = RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)


def _mam(budget: str, shares: tuple[float | None, float | None] = (None, None)) -> dict:
    """The mam preset at `budget` with the given shares (None: the module has none)."""
    raw = yaml.safe_load((preset_dir() / "mam.yaml").read_text())
    raw["budget"] = budget
    for module, share in zip(raw["modules"], shares):
        module.pop("budget_share", None)
        if share is not None:
            module["budget_share"] = share
    return raw


def test_the_mam_preset_keeps_a_real_prefix_under_a_budget():
    preset = yaml.safe_load((preset_dir() / "mam.yaml").read_text())
    assert [m.get("budget_share") for m in preset["modules"]] == [0.5, 0.5]
    preset["budget"] = "0.5%"
    assert solve(preset, BART_LARGE).sizes == solve(_mam("0.5%", (0.5, 0.5)), BART_LARGE).sizes


def test_mam_budget_with_shares_keeps_both_modules():
    assert solve(_mam("0.5%"), BART_LARGE).sizes["prefix.length"] <= 2  # the common factor on 30 : 512
    solution = solve(_mam("0.5%", (0.5, 0.5)), BART_LARGE)
    length, dim = solution.sizes["prefix.length"], solution.sizes["ffn_adapter.dim"]
    assert length >= 12 and dim >= 16  # both ingredients stay real (unshared: l=2)
    assert solution.added <= solution.budget < solution.next_added
    # each module alone fits its half: prefix 2 * l * d per attention module (He et al.'s placement: 12 encoder
    # self, 12 decoder self and 12 decoder cross-attention), adapter 2 * d * r + r + d per FFN (24 layers)
    assert 2 * length * 1024 * 36 <= solution.budget / 2 < 2 * (length + 1) * 1024 * 36
    assert (2 * 1024 * dim + dim + 1024) * 24 <= solution.budget / 2 < (2 * 1024 * (dim + 1) + dim + 1025) * 24


def test_table2_mam_stays_at_the_papers_sizes_under_the_half_percent_budget():
    raw = yaml.safe_load((preset_dir() / "glue" / "mam.yaml").read_text())
    raw["budget"] = "0.5%"
    assert solve(raw, ROBERTA_BASE).sizes == {"prefix.length": 16, "ffn_adapter.dim": 16}


@pytest.mark.parametrize("shares, culprit", [((0.5, None), "no budget_share"), ((0.7, 0.6), "sum to 1.3"),
                                             ((0.0, 0.5), "budget_share")])
def test_bad_shares_are_named(shares, culprit):
    raw = _mam("0.5%", shares)
    with pytest.raises(MethodConfigError, match=culprit):
        load_method(raw)


def test_a_share_too_small_for_one_vector_is_refused_with_the_module_named():
    with pytest.raises(MethodConfigError, match="module 'prefix'"):
        solve(_mam("0.5%", (0.001, 0.5)), BART_LARGE)


def test_by_method_sets_trainer_keys_and_module_sizes_for_that_method_only():
    table = {"prefix": {"trainer": {"label_smoothing": 0.0, "weight_decay": 0.0}, "modules": {"m0": {"length": 200}}}}
    base = TrainConfig(label_smoothing=0.1, weight_decay=0.01)
    spec, cfg = apply_by_method(table, load_method("prefix"), base)
    assert spec.modules[0].length == 200 and (cfg.label_smoothing, cfg.weight_decay) == (0.0, 0.0)
    same, untouched = apply_by_method(table, load_method("lora"), base)
    assert same == load_method("lora") and untouched == base
    with pytest.raises(UnipeltError, match="label_smoothin'"):
        apply_by_method({"prefix": {"trainer": {"label_smoothin": 0}}}, load_method("prefix"), base)
    with pytest.raises(UnipeltError, match="no module 'prefix'"):
        apply_by_method({"prefix": {"modules": {"prefix": {"length": 2}}}}, load_method("prefix"), base)
    with pytest.raises(MethodConfigError, match="lenght"):
        apply_by_method({"prefix": {"modules": {"m0": {"lenght": 2}}}}, load_method("prefix"), base)
