"""(IA)³ as the `scaling` form: checked against a plain-torch re-derivation (the base weights rescaled by hand) and
against Hugging Face PEFT's own IA3 on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

import unipelt
from numerics import assert_close_scaled, assert_same
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model


def _scales(model) -> dict[str, torch.Tensor]:
    """Every learned vector l, by slot name, moved off its init (ones) so that the test compares something."""
    generator = torch.Generator().manual_seed(5)
    out = {}
    with torch.no_grad():
        for name, slot in state_of(model).slots.items():
            slot.form.scales.copy_(1 + 0.5 * torch.randn(slot.form.scales.shape, generator=generator))
            out[name] = slot.form.scales.detach().clone()
    return out


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_ia3_is_the_base_with_rescaled_keys_values_and_ffn_activation():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    reference = copy.deepcopy(model)
    unipelt.attach(model, "ia3")
    scales = _scales(model)
    # By hand: h' = l ⊙ h. Keys and values: rows of W and b scale; FFN activation: columns of the down projection.
    with torch.no_grad():
        for index, layer in enumerate(reference.bert.encoder.layer):
            prefix = f"bert.encoder.layer.{index}"
            for linear_name, site in (("key", "attn_k"), ("value", "attn_v")):
                linear = getattr(layer.attention.self, linear_name)
                l_vec = scales[f"{prefix}.attention.self.{linear_name}.unipelt_m0_{site}"]
                linear.weight.mul_(l_vec[:, None])
                linear.bias.mul_(l_vec)
            layer.output.dense.weight.mul_(scales[f"{prefix}.output.dense.unipelt_m0_ffn_act"][None, :])
    assert_close_scaled(_logits(model, batch), _logits(reference, batch), ops=3 * len(reference.bert.encoder.layer),
                        reason="l ⊙ (W·x + b) against (l ⊙ W)·x + l ⊙ b at k, v and the FFN of each layer")


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_ia3_merges_exactly_and_unmerges(family):
    model, batch = tiny_model(family), tiny_batch(family)
    unipelt.attach(model, "ia3")
    _scales(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "unipelt_" not in n}
    out = _logits(model, batch)
    report = unipelt.merge(model)
    assert report["merged"] and not report["unmerged"]
    assert_close_scaled(_logits(model, batch), out, ops=2 * len(report["merged"]),
                        reason="the product l ⊙ W, and l ⊙ (W·x) against (l ⊙ W)·x, at each merged projection")
    unipelt.unmerge(model)
    for name, param in model.named_parameters():
        if name in before:  # unmerge puts back the weights merge() kept
            assert_same(param.detach(), before[name], msg=name)


def test_ia3_equals_peft_ia3_on_the_same_weights():
    peft = pytest.importorskip("peft")
    model, batch = tiny_model("bert"), tiny_batch("bert")
    unipelt.attach(model, "ia3")
    scales = _scales(model)
    ours = _logits(model, batch)
    config = peft.IA3Config(target_modules=r".*\.(key|value)|.*\.layer\.\d+\.output\.dense",
                            feedforward_modules=r".*\.layer\.\d+\.output\.dense", task_type="SEQ_CLS")
    theirs = peft.get_peft_model(tiny_model("bert"), config).eval()
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if not hasattr(module, "ia3_l"):
                continue
            base = name.removeprefix("base_model.model.")
            site = "attn_k" if base.endswith(".key") else "attn_v" if base.endswith(".value") else "ffn_act"
            vector = module.ia3_l["default"]
            vector.copy_(scales[f"{base}.unipelt_m0_{site}"].reshape(vector.shape))
    assert_close_scaled(_logits(theirs, batch), ours, ops=3 * model.config.num_hidden_layers,
                        reason="PEFT's and our l ⊙ ... at k, v and the FFN of each layer, in their own order")
