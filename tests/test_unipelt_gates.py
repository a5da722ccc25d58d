"""UniPELT: prefix + sequential adapter + LoRA, each behind its own gate σ(W_g·x) (compose sigmoid_gate)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import unipelt
from numerics import assert_close_scaled, assert_differs, assert_same
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

GATED_FAMILIES = ("bert", "llama", "t5")  # encoder, decoder with grouped KV heads, encoder-decoder


def _gates(model) -> list[torch.nn.Linear]:
    """Every gate W_g: on a prefix slot itself, on a bottleneck slot's composer."""
    gates = []
    for slot in state_of(model).slots.values():
        gate = getattr(slot, "gate", None) or getattr(getattr(slot, "composer", None), "gate", None)
        if gate is not None:
            gates.append(gate)
    return gates


def _set_gates(model, bias: float) -> None:
    with torch.no_grad():
        for gate in _gates(model):
            gate.weight.zero_()
            gate.bias.fill_(bias)


def _perturb(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_" in name and "gate" not in name:
                param.add_(torch.randn_like(param) * 0.2)


@pytest.mark.parametrize("family", GATED_FAMILIES)
def test_closed_gates_give_exactly_the_base_model(family):
    """With prefix_gate `delta` (our variant): a closed prefix gate is exactly the base attention. Under the preset's
    `kv` (Mao et al.) the zeroed prefix keys still draw softmax mass, so only the adapter and LoRA close exactly."""
    model, batch = tiny_model(family), tiny_batch(family)
    with torch.no_grad():
        base = model(**batch).logits
    unipelt.attach(model, unipelt.load_method("unipelt").replace_module(0, prefix_gate="delta"))
    assert len(_gates(model)) == len(state_of(model).slots)  # every module is gated
    _perturb(model)
    with torch.no_grad():
        assert_differs(model(**batch).logits, base, ops=1, reason="open gates change the outputs")
        _set_gates(model, -math.inf)  # σ(−∞) = 0: every gate closed
        assert torch.equal(model(**batch).logits, base)


def test_open_prefix_gate_is_he_et_al_gated_prefix():
    """g = 1 gives exactly the softmax-gated prefix (compose gate) with the same key/value vectors."""
    model, batch = tiny_model("bert"), tiny_batch("bert")
    prefix = dict(form="prefix", name="p", at="attn.heads", insertion="parallel", length=4)
    unipelt.attach(model, {"name": "gated", "modules": [{**prefix, "compose": "sigmoid_gate", "prefix_gate": "delta"}]})
    _perturb(model)
    _set_gates(model, math.inf)
    vectors = {n: p.detach().clone() for n, p in model.named_parameters() if "prefix." in n}
    with torch.no_grad():
        gated = model(**batch).logits
    unipelt.detach(model)
    unipelt.attach(model, {"name": "he", "modules": [{**prefix, "compose": "gate"}]})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in vectors.items():
            params[name].copy_(value)
        # `delta` adds g·(prefixed − plain attention) to the plain attention; g = σ(∞) = 1 exactly
        assert_close_scaled(model(**batch).logits, gated, ops=2 * model.config.num_hidden_layers,
                            reason="plain + 1·(prefixed − plain) against the prefixed attention, in each layer")


def test_gate_values_are_logged_per_module_kind():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    unipelt.attach(model, "unipelt")
    _set_gates(model, math.log(0.3 / 0.7))  # σ = 0.3 for every example
    model(**batch)
    metrics = unipelt.training_metrics(model)
    for kind in ("prefix", "adapter", "lora"):
        assert_close_scaled(metrics[f"mean/{kind}/gate"], 0.3, ops=3, dtype=torch.float32,
                            reason="the bias log(0.3 / 0.7) in float32, σ of it, the means over tokens and slots")
    per_slot = [k for k in metrics if k.endswith("/gate") and not k.startswith("mean/")]
    assert len(per_slot) == len(state_of(model).slots)


def test_gate_is_one_scalar_per_example():
    """Example 0 of a batch gets the same output as when run alone: the gate is not pooled over the batch."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", padded=False)
    unipelt.attach(model, "unipelt")
    _perturb(model)
    with torch.no_grad():
        for gate in _gates(model):
            gate.weight.normal_(std=1.0)
        together = model(**batch).logits
        alone = model(**{k: v[:1] for k, v in batch.items()}).logits
    # a batch of 2 against 1: every matmul of each layer (9, and the 5 gates) runs over other shapes
    assert_close_scaled(together[:1], alone, ops=14 * model.config.num_hidden_layers + 2,
                        reason="each layer's q, k, v, o, QKᵀ, softmax, AV, FFN, adapter and gates over another "
                               "batch shape; the pooler and the classifier")


def test_gates_are_counted_and_saved(tmp_path):
    model, batch = tiny_model("bert"), tiny_batch("bert")
    unipelt.attach(model, "unipelt")
    d, layers = 32, 2
    gate = d + 1
    prefix = 2 * 10 * d + gate
    r = d // 16  # the adapter width d/16 (Mao et al.: 48 at d = 768)
    adapter = (d * r + r) + (r * d + d) + gate
    lora = 2 * (d * 8 + 8 * d + gate)
    assert unipelt.count_parameters(model)["added"] == layers * (prefix + adapter + lora)
    _perturb(model)
    with torch.no_grad():
        for gate_layer in _gates(model):
            gate_layer.weight.normal_(std=1.0)
        out = model(**batch).logits
    unipelt.save_adapter(model, tmp_path)
    fresh = tiny_model("bert")
    unipelt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert_same(fresh(**batch).logits, out)  # the same tensors through the same operations


def test_kv_and_delta_gated_prefixes_share_one_attention():
    """Two sigmoid-gated prefixes of both kinds on one attention: each gate reads the attention input once."""
    model, batch = tiny_model("bert"), tiny_batch("bert")
    prefix = dict(form="prefix", at="attn.heads", insertion="parallel", compose="sigmoid_gate", length=2)
    unipelt.attach(model, {"name": "two", "modules": [{**prefix, "name": "kv"},
                                                      {**prefix, "name": "delta", "prefix_gate": "delta"}]})
    with torch.no_grad():
        out = model(**batch).logits
    assert torch.isfinite(out).all()
    assert {"mean/kv/gate", "mean/delta/gate"} <= set(unipelt.training_metrics(model))


def test_site_kinds_a_model_lacks_are_skipped_with_a_warning():
    """A preset attaches to every family: prefix presets skip cross-attention on a model without it; a module left
    with no site is skipped with a warning; a method left with nothing fails."""
    bert = tiny_model("bert")
    unipelt.attach(bert, "prefix")  # at: [attn.heads, cross_attn.heads]; BERT has self-attention only
    assert {slot.site for slot in state_of(bert).slots.values()} == {"attn.heads"}
    hybrid = {"name": "h", "modules": [
        {"form": "bottleneck", "name": "a", "at": "cross_attn.q", "insertion": "parallel", "compose": "add"},
        {"form": "bottleneck", "name": "b", "at": "attn.q", "insertion": "parallel", "compose": "add"}]}
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"site 'cross_attn\.q' does not exist in this model .* that module is skipped"):
        unipelt.attach(model, hybrid)
    assert {slot.site for slot in state_of(model).slots.values()} == {"attn.q"}
    with pytest.raises(unipelt.AttachError, match="site 'cross_attn.q' does not exist in this model"):
        unipelt.attach(tiny_model("llama"), {"name": "c", "modules": hybrid["modules"][:1]})


def test_pfeiffer_placement_on_a_pre_ln_model_reads_the_residual_stream():
    """Pre-LN (Llama): the adapter at ffn.ln reads the layer output z = h_ffn + residual and adds to it (AdapterHub
    with no LayerNorm to re-apply): z + up(relu(down(z)))."""
    model, batch = tiny_model("llama"), tiny_batch("llama")
    unipelt.attach(model, "pfeiffer")
    _perturb(model)
    layer = model.model.layers[0]
    adapter = getattr(layer, "unipelt_m0_ffn_ln").form
    seen = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(**batch)
        with unipelt.disabled(model):
            model(**batch)
    handle.remove()
    adapted, z = seen[0], seen[1]
    with torch.no_grad():
        expected = z + F.linear(F.relu(F.linear(z, adapter.down.weight, adapter.down.bias)), adapter.up.weight,
                                adapter.up.bias)
    assert_close_scaled(adapted, expected, ops=2,
                        reason="the up-projection and the residual add (one addmm on the fused path) against by hand")
