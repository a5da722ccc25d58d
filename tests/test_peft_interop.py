"""unipelt <-> Hugging Face PEFT LoRA files: identical outputs both ways, on tiny models of five families."""

from __future__ import annotations

import json
import warnings

import pytest
from needs import need_module
import torch

import unipelt
from numerics import assert_close_scaled, assert_differs
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

peft = need_module("peft")

# PEFT computes each LoRA on its own (W·x + s·B(A·x), a scale alpha / r, a fused projection as one block, two modules
# on one projection as one rank): equal to ours up to the rounding of each adapted projection.
PEFT_SIDE = "PEFT's W·x + (alpha / r)·B(A·x) against ours at each adapted projection"


def lora_ops(model) -> int:
    """The projections a LoRA adapts (each computed by its own code on the two sides)."""
    return len(state_of(model).slots)

HYBRID = {
    "name": "hybrid_lora",
    "modules": [
        {"form": "bottleneck", "name": "qv", "at": ["attn.q", "attn.v"], "insertion": "parallel", "compose": "scale",
         "scale": 2.0, "dim": 4, "activation": "none", "init": "lora"},
        {"form": "bottleneck", "name": "down", "at": "ffn.down", "insertion": "parallel", "compose": "scale",
         "scale": "learned", "dim": 2, "activation": "none", "init": "lora", "layers": [1]},
    ],
}


def inputs(family: str) -> dict:
    return {k: v for k, v in tiny_batch(family).items() if k != "labels"}


def logits(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(family)).logits


def randomize(model, seed: int = 7) -> None:
    """Random values for everything the method trains: adapters, learned scales (around 1) and the task head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2 + (1.0 if param.dim() == 0 else 0.0))


def peft_from(directory, family: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_model(family, seed=1), str(directory)).eval()


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "gpt2", "bart", "t5"])
def test_export_loads_in_peft_with_identical_outputs(tmp_path, family):
    model = tiny_model(family, seed=1)
    unipelt.attach(model, HYBRID)
    randomize(model)
    expected = logits(model, family)
    assert_differs(expected, logits(tiny_model(family, seed=1), family), ops=lora_ops(model),
                   reason="the adapter matters")
    unipelt.export_peft(model, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == (8 if family == "gpt2" else 4)  # gpt2: q+v chunks
    if family != "gpt2":
        assert config["lora_alpha"] == 8  # scale 2 = alpha / r
    if family in ("bert", "roberta"):
        assert config["modules_to_save"] == (["classifier"] if family == "bert"
                                             else ["classifier.dense", "classifier.out_proj"])
    assert_close_scaled(logits(peft_from(tmp_path, family), family), expected, ops=lora_ops(model), reason=PEFT_SIDE)


def test_export_config_reads_like_a_peft_config(tmp_path):
    model = tiny_model("bert", seed=1)
    unipelt.attach(model, HYBRID)
    unipelt.export_peft(model, tmp_path)
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert sorted(config.target_modules) == ["layer.1.output.dense", "query", "value"]
    # the FFN module differs from the default (r=4, alpha=8): rank 2, alpha = learned scale (1 at init) x 2
    assert config.rank_pattern == {"bert.encoder.layer.1.output.dense": 2}
    assert config.alpha_pattern == {"bert.encoder.layer.1.output.dense": 2.0}


def test_gpt2_fused_projection_becomes_one_block_lora(tmp_path):
    model = tiny_model("gpt2", seed=1)
    unipelt.attach(model, "lora")  # attn.q and attn.v are chunks 0 and 2 of c_attn
    randomize(model)
    unipelt.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and config["r"] == 16 and config["lora_alpha"] == 16
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (96, 16) and torch.count_nonzero(b[32:64]) == 0  # no update on the keys
    assert_close_scaled(logits(peft_from(tmp_path, "gpt2"), "gpt2"), logits(model, "gpt2"), ops=lora_ops(model),
                        reason=f"{PEFT_SIDE}; q and v as one rank-16 block of c_attn")


def peft_model(family: str, **lora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(tiny_model(family, seed=1), peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if param.requires_grad:  # LoRA A and B (B starts at zero) and the modules_to_save copies
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return wrapped.eval()


IMPORT_CASES = {
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], lora_dropout=0.1,
                 modules_to_save=["classifier"], rank_pattern={"layer.1.attention.self.value": 2},
                 alpha_pattern={"intermediate.dense": 3}),
    "llama": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj", "o_proj"],
                  rank_pattern={"o_proj": 8}),
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "t5": dict(r=2, lora_alpha=4, target_modules=["q", "v", "wo"]),
    # PEFT's layer filter and exclusion: layer 1 of each stack only, and not the cross-attention's q_proj
    "bart": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], layers_to_transform=[1],
                 exclude_modules=["encoder_attn.q_proj"]),
}


@pytest.mark.parametrize("family", list(IMPORT_CASES))
def test_import_of_a_peft_checkpoint_gives_identical_outputs(tmp_path, family):
    wrapped = peft_model(family, **IMPORT_CASES[family])
    expected = logits(wrapped, family)
    wrapped.save_pretrained(str(tmp_path))
    model = tiny_model(family, seed=1)
    base = logits(model, family)
    unipelt.import_peft(model, tmp_path)
    assert_differs(base, expected, ops=lora_ops(model), reason="the adapter matters")
    assert_close_scaled(logits(model, family), expected, ops=lora_ops(model), reason=PEFT_SIDE)
    # The imported method is an ordinary unipelt method: disabled() gives the base back (head excepted).
    assert state_of(model).method.name == "peft_lora"
    if family == "bart":
        placed = {(p.stack, p.layer, p.site) for p in state_of(model).placements}
        assert {layer for _, layer, _ in placed} == {1} and ("decoder", 1, "cross_attn.q") not in placed
        assert ("decoder", 1, "cross_attn.v") in placed
    if family == "llama":
        scales = sorted({m.scale for m in state_of(model).method.modules})
        assert scales == pytest.approx([16 / 8 ** 0.5, 16 / 4 ** 0.5])  # rslora: alpha / sqrt(r)


def test_round_trip_through_peft_files(tmp_path):
    model = tiny_model("bert", seed=1)
    unipelt.attach(model, HYBRID)
    randomize(model)
    expected = logits(model, "bert")
    unipelt.export_peft(model, tmp_path)
    again = tiny_model("bert", seed=1)
    unipelt.import_peft(again, tmp_path)
    # the learned scale comes back as the fixed scale alpha / r (the same number, another code path)
    assert_close_scaled(logits(again, "bert"), expected, ops=lora_ops(again),
                        reason="a learned scale against the fixed alpha / r it was exported as, at each projection")
    dims = sorted((m.at, m.dim) for m in state_of(again).method.modules)
    assert dims == [(("attn.q", "attn.v"), 4), (("ffn.down",), 2)]
    # and the imported model can be merged like any LoRA
    unipelt.merge(again)
    assert_close_scaled(logits(again, "bert"), expected, ops=3 * lora_ops(again),
                        reason="the above, the sum W + s·BA and (W + s·BA)·x against W·x + s·B(A·x), at each "
                               "merged projection")


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_adalora_exports_as_lora_with_its_pruned_ranks(tmp_path, family):
    model = tiny_model(family, seed=1)
    unipelt.attach(model, "adalora")
    randomize(model)
    with torch.no_grad():
        for slot in state_of(model).slots.values():
            keep = torch.ones(slot.form.rank, dtype=torch.bool)
            keep[::3] = False  # the final pattern, as the rank allocator fixes it: triplets 0, 3, 6, 9 pruned
            slot.form.apply_mask(keep, final=True)
    expected = logits(model, family)
    unipelt.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8  # 12 initial triplets, 4 pruned
    assert config["lora_alpha"] == pytest.approx(16 / 12 * 8)  # the preset's scale alpha / init_r, times r
    assert_close_scaled(logits(peft_from(tmp_path, family), family), expected, ops=lora_ops(model),
                        reason="P·(λ⊙Q·x) over 12 triplets (4 zeroed) against the exported (diag(λ)·Q)·x over 8")


def test_two_modules_on_one_projection_export_as_one_lora(tmp_path):
    # A hybrid with two LoRA modules on W_q (ranks 2 and 3, scales 2 and 0.5): one PEFT LoRA of rank 5 on query.
    two = {"name": "two", "modules": [
        {**HYBRID["modules"][0], "name": "a", "at": "attn.q", "dim": 2},
        {**HYBRID["modules"][0], "name": "b", "at": "attn.q", "dim": 3, "scale": 0.5},
    ]}
    model = tiny_model("llama", seed=1)
    unipelt.attach(model, two)
    randomize(model)
    unipelt.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"] and config["r"] == 5 and config["lora_alpha"] == 5
    assert_close_scaled(logits(peft_from(tmp_path, "llama"), "llama"), logits(model, "llama"), ops=lora_ops(model),
                        reason=f"{PEFT_SIDE}; the two modules on W_q as one rank-5 product")
