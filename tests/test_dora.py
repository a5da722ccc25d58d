"""DoRA (the dora form) against Hugging Face PEFT's LoraConfig(use_dora=True), an independent implementation, on the
same base weights: the magnitude at init, outputs over training steps (so B ≠ 0 and m moves), training with
dropout (the same masks on both sides), merged weights, a 4-bit NF4 base (the same Linear4bit layers on both
sides), export_peft → PeftModel.from_pretrained and import_peft of PEFT's own file (GPT-2's fused c_attn
included), and the parameter count of the preset on BERT-base written out by hand."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertConfig

import unipelt
from needs import need_module
from numerics import assert_close_scaled, assert_differs, assert_same
from tiny_models import tiny_batch, tiny_model
from unipelt.attach import state_of

peft = need_module("peft")

RANK, ALPHA = 4, 8.0
# Three projections per family (biased on BERT, bias-free on Llama and T5), and PEFT's target_modules for them
# (T5: a regex, since "q" alone also names the decoder's cross-attention query).
SITES = {"bert": ("attn.q", "attn.v", "ffn.up"), "llama": ("attn.q", "attn.v", "ffn.down"),
         "t5": ("attn.q", "attn.v", "ffn.down")}
TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "down_proj"],
           "t5": r".*(SelfAttention\.[qv]|DenseReluDense\.wo)"}
STEPS = 3
# Per adapted projection and pass (a forward, or a backward), the two sides round differently in at most: PEFT's
# W·x taken as (W·x + b) − b from the base output (two roundings where the base has a bias), B·A formed as
# B(A(I))ᵀ vs B·A inside the row norm, and, backward, the gradient of x summed over the base and the (g − 1)·W·x
# paths in another order. Measured: at most 6 ulps of the reference's magnitude; each deliberate break of the form
# tried (norm not detached, m left out, W read from the float layer QLoRA replaced, a chunk's rows wrong, dropout
# on one path only, ΔW without the renormalisation) is off by 10⁴ ulps or more.
OPS_PER_PASS = 4
REASON = ("(W·x + b) − b vs W·x, B(A(I))ᵀ vs B·A inside the row norm, and the gradient of x summed in another "
          "order, at each adapted projection, in every forward and backward pass so far")


def ops(family: str, passes: int) -> int:
    return OPS_PER_PASS * len(SITES[family]) * passes


def dora_method(family: str, **extra) -> dict:
    return {"name": "dora_test", "train_head": False, "modules": [dict(
        form="dora", at=list(SITES[family]), insertion="parallel", compose="add", dim=RANK, alpha=ALPHA, **extra)]}


def inputs(family: str) -> dict:
    return {k: v for k, v in tiny_batch(family).items() if k != "labels"}


def peft_dora(model, family: str, dropout: float = 0.0):
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, use_dora=True,
                             target_modules=TARGETS[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on 4-bit merging and the like
        return peft.get_peft_model(model, config)


def dora_pairs(ours, theirs):
    """(our DoRA Δh module, PEFT's LoRA layer) per adapted projection."""
    inner = theirs.base_model.model
    state = state_of(ours)
    return [(state.slots[f"{p.host_name}.{p.slot_name}"].form, inner.get_submodule(p.h_name))
            for p in state.placements]


def same_start(ours, theirs) -> None:
    """Both sides start from our A (PEFT draws its own), B = 0, and their own m, which must already agree."""
    for delta, layer in dora_pairs(ours, theirs):
        assert_same(delta.magnitude.detach(), layer.lora_magnitude_vector["default"].weight.detach(),
                    msg="m at init: the row norms of the host's weight")
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(delta.down.weight)
            assert_same(layer.lora_B["default"].weight, delta.up.weight)


def forward(model, batch: dict, seed: int | None):
    """The model's output; in train mode (dropout on) from `seed`, so that both sides draw the same masks (the
    model's own dropouts and DoRA's, in the same order: PEFT's after the base layer, as the slot's hook)."""
    if seed is not None:
        torch.manual_seed(seed)
    return model(**batch)


def train_both(ours, theirs, family: str, steps: int = STEPS, dropout: bool = False) -> int:
    """AdamW steps on the same batch (AdamW moves B off zero at its learning rate's pace, whatever the gradients'
    size), checking the logits before every step: in eval mode (the same function on both sides), or with
    `dropout` in train mode with the same masks on both sides, and once more after the last step. Returns the
    passes so far (forward and backward)."""
    batch = tiny_batch(family)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    for model in (ours, theirs):
        model.train(dropout)
    for step in range(steps):
        seed = step if dropout else None
        out, their_out = forward(ours, batch, seed), forward(theirs, batch, seed)
        assert_close_scaled(out.logits, their_out.logits, ops=ops(family, 2 * step + 1), reason=REASON,
                            msg=f"{family} step {step}")
        out.loss.backward()
        their_out.loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    seed = steps if dropout else None
    with torch.no_grad():
        assert_close_scaled(forward(ours, batch, seed).logits, forward(theirs, batch, seed).logits,
                            ops=ops(family, 2 * steps + 1), reason=REASON, msg=f"{family} after {steps} steps")
    return 2 * steps + 1


def assert_moved(ours) -> None:
    for delta in (s.form for s in state_of(ours).slots.values()):
        assert delta.up.weight.abs().max() > 0.01, "B still (about) zero: the comparison would not test B·A"
        assert_differs(delta.magnitude, torch.linalg.norm(delta.host_weight(), dim=1), ops=1,
                       reason="m trained away from the row norms of W")


def start_pair(family: str, **extra):
    ours = unipelt.attach(tiny_model(family), dora_method(family, **extra))
    theirs = peft_dora(tiny_model(family), family, dropout=extra.get("dropout", 0.0))
    same_start(ours, theirs)
    return ours, theirs


def check_trained_pair(ours, theirs, family: str, passes: int) -> None:
    """After training: B and m moved, the same outputs (eval mode) and the same trained m."""
    assert_moved(ours)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected = theirs(**inputs(family)).logits
        assert_close_scaled(ours(**inputs(family)).logits, expected, ops=ops(family, passes + 1), reason=REASON)
        assert_differs(expected, tiny_model(family)(**inputs(family)).logits, ops=1, reason="the adapter matters")
    for delta, layer in dora_pairs(ours, theirs):
        assert_close_scaled(delta.magnitude, layer.lora_magnitude_vector["default"].weight, ops=ops(family, passes),
                            reason=REASON, msg="trained m")


@pytest.mark.parametrize("family", list(SITES))
def test_outputs_equal_peft_over_training_steps(family):
    ours, theirs = start_pair(family)
    passes = train_both(ours, theirs, family)
    check_trained_pair(ours, theirs, family, passes)


def test_training_with_dropout_equals_peft():
    """Train mode, DoRA's dropout 0.1 (and the model's own): x is dropped out before both W·x and B·A·x."""
    ours, theirs = start_pair("bert", dropout=0.1)
    passes = train_both(ours, theirs, "bert", dropout=True)
    check_trained_pair(ours, theirs, "bert", passes)
    ours.train()
    with torch.no_grad():
        assert_differs(forward(ours, inputs("bert"), seed=0).logits, ours.eval()(**inputs("bert")).logits, ops=1,
                       reason="dropout is on in train mode")


@pytest.mark.parametrize("family", list(SITES))
def test_merged_weights_equal_peft_merged_weights(family):
    ours, theirs = start_pair(family)
    passes = train_both(ours, theirs, family)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        unmerged = ours(**inputs(family)).logits
    pairs = [(delta.host_ref.name, layer) for delta, layer in dora_pairs(ours, theirs)]
    unipelt.merge(ours)
    theirs.merge_adapter()
    params = dict(ours.named_parameters())
    for name, layer in pairs:
        # W + (g·(W + s·B·A) − W) here vs g·(W + s·B·A) in PEFT: one rounding more, after the trajectory's
        assert_close_scaled(params[f"{name}.weight"], layer.base_layer.weight, ops=ops(family, passes) + 1,
                            reason=f"{REASON}; W + (X − W) vs X at the merge", msg=name)
    with torch.no_grad():
        assert_close_scaled(ours(**inputs(family)).logits, unmerged, ops=2 * ours.config.num_hidden_layers,
                            reason="the merged (g ⊙ (W + s·B·A))·x vs W·x + Δh in each adapted layer")


def _linear4bit_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]


# ("bert", "bfloat16") once failed by 6346 ulps: weight_fold.fold rounded ΔW to the 4-bit layer's bias dtype (the
# compute dtype, as bitsandbytes casts it) before adding it to the float32 dequantized weight.
@pytest.mark.parametrize("family, compute_dtype", [
    ("bert", "float32"), ("bert", "bfloat16"), ("llama", "float32"), ("llama", "bfloat16")])
def test_on_a_4bit_base_outputs_and_merge_equal_peft(family, compute_dtype):
    """The same Linear4bit layers on both sides. In eval mode PEFT takes W·x from its base output (computed in the
    compute dtype) where the slot, which gets x only, computes W·x from the dequantized weight in x's dtype; with
    dropout on, PEFT computes it that way too. So: float32 compute in eval mode, bfloat16 (QLoRA's) in train mode
    with dropout, each the same computation on both sides up to float32 rounding."""
    need_module("bitsandbytes")
    from unipelt.quantize import dequantize, quantize_base

    dropout = 0.1 if compute_dtype == "bfloat16" else 0.0
    method = {**dora_method(family, dropout=dropout), "quantize": "nf4", "compute_dtype": compute_dtype}
    ours = unipelt.attach(tiny_model(family), method)
    names = _linear4bit_names(ours)
    reference = tiny_model(family)  # the same weights, quantized the same way: the same packed NF4 bytes
    quantize_base(reference, unipelt.load_method(method), names, [])
    for name in names:
        assert_same(ours.get_submodule(name).weight.data, reference.get_submodule(name).weight.data, msg=name)
    reference.is_loaded_in_4bit = True  # PEFT's cue to wrap Linear4bit layers in its 4-bit LoRA layer
    theirs = peft_dora(reference, family, dropout=dropout)
    assert all(type(layer).__name__ == "Linear4bit" for _, layer in dora_pairs(ours, theirs))
    same_start(ours, theirs)  # m: the row norms of the dequantized 4-bit weight on both sides
    for delta, _ in dora_pairs(ours, theirs):  # read through the accessor, not the float weight it replaced
        assert_same(delta.host_weight(), dequantize(delta.host_ref.module))
    passes = train_both(ours, theirs, family, dropout=dropout > 0)
    assert_moved(ours)
    pairs = [(delta.host_ref.module, layer.base_layer) for delta, layer in dora_pairs(ours, theirs)]
    ours_target, their_target = requantized_targets(lambda: unipelt.merge(ours)), \
        requantized_targets(theirs.merge_adapter)
    for host, base_layer in pairs:
        # What each side requantizes: W + (X − W) here vs X = g·(W + s·B·A) in PEFT. (Not the NF4 weights that come
        # out: a rounding step apart there can be one NF4 code or 8-bit block-scale code apart.)
        ours_float, their_float = ours_target[id(host.weight)], their_target[id(base_layer.weight)]
        assert_close_scaled(ours_float, their_float, ops=ops(family, passes) + 1,
                            reason=f"{REASON}; W + (X − W) vs X before requantizing")
        for layer, target in ((host, ours_float), (base_layer, their_float)):  # what each 4-bit weight came from
            assert_same(dequantize(layer), dequantize(requantized(layer, target)))


def requantized_targets(merge) -> dict[int, torch.Tensor]:
    """Run `merge`, recording the float weight each Linear4bit is requantized from, by id of the new 4-bit weight
    (both merges build it as bitsandbytes.nn.Params4bit(weight, ...) and quantize it in place on the device)."""
    import bitsandbytes as bnb

    real, targets = bnb.nn.Params4bit, {}

    def recording(data, *args, **kwargs):
        params = real(data, *args, **kwargs)
        targets[id(params)] = data.detach().clone()
        return params

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn that requantizing rounds
        patch.setattr(bnb.nn, "Params4bit", recording)
        merge()
    return targets


def requantized(layer, weight: torch.Tensor):
    """`weight` quantized as `layer`'s NF4 weight is (block size, double quantization), in a copy of the layer."""
    import bitsandbytes as bnb

    copy = type(layer)(layer.in_features, layer.out_features, bias=False, device="meta")
    params = layer.weight
    copy.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=params.blocksize, quant_type="nf4",
                                    compress_statistics=params.compress_statistics, module=copy).to("cpu")
    return copy


@pytest.mark.parametrize("family", list(SITES))
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, family):
    ours = unipelt.attach(tiny_model(family), dora_method(family))
    ours.eval()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):  # B ≠ 0 and m moved, by our own training
        ours(**tiny_batch(family)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_moved(ours)
    unipelt.export_peft(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path)).eval()
    assert theirs.peft_config["default"].use_dora
    with torch.no_grad():
        assert_close_scaled(ours(**inputs(family)).logits, theirs(**inputs(family)).logits,
                            ops=ops(family, 1), reason=REASON)


# T5: q and v of the cross-attention too
IMPORTED = {"bert": TARGETS["bert"], "llama": TARGETS["llama"], "t5": ["q", "v", "wo"], "gpt2": ["c_attn", "c_fc"]}


@pytest.mark.parametrize("family", list(IMPORTED))
def test_import_of_a_peft_dora_file_gives_the_same_outputs(tmp_path, family):
    """PEFT trains nothing here: random A, B and m put into PEFT's model and saved by PEFT. GPT-2: one DoRA on the
    fused c_attn becomes three chunk slots, each with its rows of W, B and m."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=True, target_modules=IMPORTED[family],
                             fan_in_fan_out=family == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_model(family), config).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                jitter = 0.2 * torch.randn(param.shape, generator=generator)
                param.copy_(param * (1 + jitter) if "magnitude" in name else jitter)
        expected = theirs(**inputs(family)).logits
    theirs.save_pretrained(str(tmp_path))
    ours = unipelt.import_peft(tiny_model(family), tmp_path)
    assert {m.form for m in state_of(ours).method.modules} == {"dora"}
    with torch.no_grad():
        assert_close_scaled(ours(**inputs(family)).logits, expected, ops=OPS_PER_PASS * len(IMPORTED[family]),
                            reason=REASON)
        assert_differs(expected, tiny_model(family)(**inputs(family)).logits, ops=1, reason="the adapter matters")


def test_export_of_fused_chunks_is_refused_in_one_line(tmp_path):
    ours = unipelt.attach(tiny_model("gpt2"), "dora")  # attn.q, attn.k, attn.v: three chunks of c_attn
    with pytest.raises(unipelt.AdapterFileError, match=r"shares projection '.*c_attn' .* cannot be stacked"):
        unipelt.export_peft(ours, tmp_path)


def test_the_preset_counts_as_written_out_by_hand_on_bert_base():
    """The preset (r = 32 at q, k, v, up, down) on BERT-base, counted from its config on the meta device."""
    d, d_ff, layers, r = 768, 3072, 12, 32

    def dora(d_in: int, d_out: int) -> int:  # A r × d_in, B d_out × r, m d_out
        return r * (d_in + d_out) + d_out

    per_layer = 3 * dora(d, d) + dora(d, d_ff) + dora(d_ff, d)
    counts = unipelt.count_parameters(BertConfig(), "dora")
    assert counts["added"] == counts["trainable"] == layers * per_layer == 4_792_320
    assert counts["reparam"] == 0


@pytest.mark.parametrize("order", ["lora_first", "dora_first"])
def test_merge_of_two_modules_on_one_projection_takes_each_map_before_folding(order):
    """DoRA's ΔW reads its host's weight: with a LoRA on the same projection merged first, a map taken after that
    fold normalised the wrong weight (merged output off by 2e-2 on Llama). merge() now takes every map of one
    projection before it folds any, so the order of the modules does not matter."""
    lora = {"form": "bottleneck", "name": "lora", "at": "attn.q", "insertion": "parallel", "compose": "scale",
            "alpha": 8, "dim": 2, "activation": "none", "init": "lora"}
    dora = {"form": "dora", "name": "dora", "at": "attn.q", "insertion": "parallel", "compose": "add", "dim": 2}
    modules = [lora, dora] if order == "lora_first" else [dora, lora]
    model, batch = tiny_model("llama"), tiny_batch("llama")
    unipelt.attach(model, {"name": "two_on_q", "modules": modules})
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "unipelt_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        report = unipelt.merge(model)
        merged = model(**batch).logits
    assert len(report["merged"]) == 2 * model.config.num_hidden_layers
    assert_close_scaled(merged, unmerged, ops=4 * model.config.num_hidden_layers,
                        reason="(W + ΔW_lora + ΔW_dora)·x against W·x + ΔW_lora·x + DoRA's Δh in each layer")
