"""UniPELT against a plain-torch re-derivation of Mao et al.'s code (morningmoni/UniPELT) on one BERT layer with the
same weights: LoRA on W_q, W_v scaled by its gate instead of alpha / r; the prefix keys and values multiplied by
their gate before they join the attention; the adapter and its gate reading LN(h_ffn + residual), and the layer's
LayerNorm applied again to h_ffn + residual + g·adapter; every gate the mean over tokens of σ(W_g·x)."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

import unipelt
from numerics import assert_close_scaled
from unipelt.attach import state_of
from tiny_models import perturb_adapters, tiny_batch, tiny_model


def _gate(linear, x):
    return torch.sigmoid(x @ linear.weight.T + linear.bias).mean(dim=1, keepdim=True)  # [batch, 1, 1]


def _slot(model, suffix):
    return next(slot for name, slot in state_of(model).slots.items()
                if name.startswith("bert.encoder.layer.0.") and name.endswith(suffix))


def _reference_layer(model, x, mask):
    layer = model.bert.encoder.layer[0]
    attention, heads = layer.attention.self, model.config.num_attention_heads
    batch, tokens, d = x.shape
    head_dim = d // heads

    def linear(module, t):  # the frozen weights alone: calling the module would run the attached hooks
        return F.linear(t, module.weight, module.bias)

    def lora(projection, slot):
        A, B = slot.form.down.weight, slot.form.up.weight
        return linear(projection, x) + _gate(slot.composer.gate, x) * (x @ A.T @ B.T)

    def split(t):
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)

    q = split(lora(attention.query, _slot(model, "unipelt_lora_attn_q")))
    k = split(linear(attention.key, x))
    v = split(lora(attention.value, _slot(model, "unipelt_lora_attn_v")))
    prefix = _slot(model, "unipelt_prefix_attn_heads")
    p_keys, p_values = prefix.prefix.key_values()  # [heads, l, head_dim]
    g = _gate(prefix.gate, x)[:, :, :, None]  # [batch, 1, 1, 1]
    k = torch.cat([g * p_keys.expand(batch, -1, -1, -1), k], dim=2)
    v = torch.cat([g * p_values.expand(batch, -1, -1, -1), v], dim=2)
    visible = torch.cat([torch.ones(batch, p_keys.shape[1]), mask.float()], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + (1 - visible)[:, None, None, :] * -1e9
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, d)
    out = layer.attention.output
    a = out.LayerNorm(out.dense(context) + x)
    h = layer.output.dense(layer.intermediate(a))
    norm = layer.output.LayerNorm

    def ln(t):
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    z = h + a
    normed = ln(z)
    adapter = _slot(model, "unipelt_adapter_ffn_ln")
    delta = F.relu(normed @ adapter.form.down.weight.T + adapter.form.down.bias) @ adapter.form.up.weight.T \
        + adapter.form.up.bias
    return ln(z + _gate(adapter.composer.gate, normed) * delta)


def test_unipelt_layer_matches_mao_et_al_equations():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    unipelt.attach(model, "unipelt")
    perturb_adapters(model, scale=0.3)
    seen = {}
    layer = model.bert.encoder.layer[0]
    handles = [layer.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0]), with_kwargs=True),
               layer.register_forward_hook(lambda m, a, o: seen.update(y=o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        model(**batch)
        expected = _reference_layer(model, seen["x"], batch["attention_mask"])
    for handle in handles:
        handle.remove()
    # written out by hand: LoRA on q and v (2 each), the gated prefix attention (scores, softmax, AV), the 3 gates'
    # x·Wᵀ + b, the adapter's two projections and the LayerNorm applied again
    assert_close_scaled(seen["y"], expected, ops=13,
                        reason="the layer's LoRA, prefix attention, gates, adapter and LayerNorm, by hand")


def test_gates_start_as_in_the_reference_and_the_adapter_is_d_over_16():
    model = tiny_model("bert")
    unipelt.attach(model, "unipelt")
    gates = [slot.gate if hasattr(slot, "prefix") else slot.composer.gate for slot in state_of(model).slots.values()]
    weights = torch.cat([g.weight.flatten() for g in gates])
    assert all(torch.equal(g.bias, torch.zeros(1)) for g in gates)
    assert 0.01 < float(weights.std()) < 0.03  # N(0, 0.02)
    assert _slot(model, "unipelt_adapter_ffn_ln").form.down.out_features == model.config.hidden_size // 16
