"""Prefix tuning acts inside attention: checked against plain-torch references and He et al.'s gated form."""

from __future__ import annotations

import pytest
import torch

import unipelt
from numerics import assert_close_scaled, assert_differs, assert_same
from unipelt.forms.prefix import PrefixSlot, prefix_attention
from tiny_models import ENCODER_DECODERS, FAMILIES, tiny_batch, tiny_model

GATED = {"name": "prefix4", "modules": [{"form": "prefix", "at": "attn.heads", "insertion": "parallel",
                                         "compose": "gate", "length": 4}]}
UNGATED = {"name": "prefix_add", "modules": [{**GATED["modules"][0], "compose": "add"}]}
ALL_ATTENTION = {"name": "prefix_all", "modules": [{**GATED["modules"][0], "at": ["attn.heads", "cross_attn.heads"],
                                                    "mlp_dim": 16}]}


def _bert_attention(impl: str, method: dict):
    model = tiny_model("bert", attn=impl)
    torch.manual_seed(0)
    unipelt.attach(model, method)
    attention = model.bert.encoder.layer[0].attention.self
    slot = next(c for c in attention.children() if isinstance(c, PrefixSlot))
    return attention, slot


def _qkv_mask(impl: str):
    g = torch.Generator().manual_seed(3)
    batch, heads, length, dim = 2, 4, 6, 8
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g) for _ in range(3))
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[1, -2:] = False  # padding on the second example
    bool_mask = keep[:, None, None, :].expand(batch, 1, length, length)
    additive = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    return q, k, v, (bool_mask if impl == "sdpa" else additive), additive


def _softmax_attention(q, k, v, additive=None):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if additive is not None:
        scores = scores + additive
    return torch.softmax(scores, dim=-1) @ v, scores


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gated_prefix_equals_attention_over_concatenation_and_he_et_al_form(impl):
    attention, slot = _bert_attention(impl, GATED)
    q, k, v, mask, additive = _qkv_mask(impl)
    out, _ = prefix_attention(attention, q, k, v, mask, scaling=q.shape[-1] ** -0.5, dropout=0.0)
    p_k, p_v = (t.detach().unsqueeze(0).expand(q.shape[0], -1, -1, -1) for t in slot.prefix.key_values())

    # Reference 1: attention over [P_k; K], [P_v; V] with the prefix always visible.
    wide_mask = torch.cat([torch.zeros(*additive.shape[:-1], p_k.shape[2]), additive], dim=-1)
    concat, _ = _softmax_attention(q, torch.cat([p_k, k], 2), torch.cat([p_v, v], 2), wide_mask)
    assert_close_scaled(out, concat.transpose(1, 2), ops=3,
                        reason="the scores, their softmax and the weighted sum, by the attention kernel vs by hand")

    # Reference 2: He et al. eq. (7): (1 - λ)·Attn(x) + λ·softmax(q P_kᵀ) P_v, λ the softmax mass on the prefix.
    base, base_scores = _softmax_attention(q, k, v, additive)
    prefix_only, prefix_scores = _softmax_attention(q, p_k, p_v)
    mass_prefix = prefix_scores.exp().sum(-1, keepdim=True)
    mass_input = base_scores.exp().sum(-1, keepdim=True)
    lam = mass_prefix / (mass_prefix + mass_input)
    gated = (1 - lam) * base + lam * prefix_only
    assert_close_scaled(out, gated.transpose(1, 2), ops=4,
                        reason="one softmax over [P_k; K] against two softmaxes, their masses λ and the blend")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_ungated_prefix_adds_prefix_attention(impl):
    attention, slot = _bert_attention(impl, UNGATED)
    q, k, v, mask, additive = _qkv_mask(impl)
    out, _ = prefix_attention(attention, q, k, v, mask, scaling=q.shape[-1] ** -0.5, dropout=0.0)
    p_k, p_v = (t.detach().unsqueeze(0).expand(q.shape[0], -1, -1, -1) for t in slot.prefix.key_values())
    expected = _softmax_attention(q, k, v, additive)[0] + _softmax_attention(q, p_k, p_v)[0]
    assert_close_scaled(out, expected.transpose(1, 2), ops=3,
                        reason="the scores, softmaxes and weighted sums of the two attentions, kernel vs by hand")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [GATED, UNGATED, ALL_ATTENTION], ids=["gate", "add", "all_attention"])
def test_eager_and_sdpa_agree_with_padding(family, method):
    if method is ALL_ATTENTION and family not in ENCODER_DECODERS:
        method = {**GATED, "modules": [{**GATED["modules"][0], "mlp_dim": 16}]}
    outputs = []
    for impl in ("eager", "sdpa"):
        model = tiny_model(family, attn=impl)
        torch.manual_seed(5)
        unipelt.attach(model, method)
        outputs.append(_logits(model, tiny_batch(family)))
    # every attention of the model (self, and on encoder-decoders decoder self and cross) by another kernel
    attentions = (3 if family in ENCODER_DECODERS else 1) * model.config.num_hidden_layers
    assert_close_scaled(outputs[0], outputs[1], ops=3 * attentions,
                        reason="the scores, softmax and weighted sum of every attention, eager vs sdpa")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_does_not_leak_into_real_tokens(impl):
    model = tiny_model("bert", attn=impl)
    unipelt.attach(model, GATED)
    batch = tiny_batch("bert", padded=True)
    short = {"input_ids": batch["input_ids"][1:, :-2], "attention_mask": batch["attention_mask"][1:, :-2]}
    with torch.no_grad():
        padded_hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        short_hidden = model.bert(**short)[0]
    # a batch of 2 × 8 tokens against 1 × 6: every matmul and attention of each layer runs over other shapes
    assert_close_scaled(padded_hidden[1, :-2], short_hidden[0], ops=9 * model.config.num_hidden_layers,
                        reason="q, k, v, o, QKᵀ, softmax, AV and the FFN's two matmuls over other shapes, per layer")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_decoder_prefix_keeps_causality(family, impl):
    model = tiny_model(family, attn=impl)
    unipelt.attach(model, GATED)
    ids = tiny_batch(family, batch=1, padded=False)["input_ids"]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 100 + 1
    a, b = _logits(model, {"input_ids": ids}), _logits(model, {"input_ids": changed})
    # the earlier positions: the same values through the same operations (row by row; the changed last token's
    # attention weight is exp(−inf) = 0 for them), so bit for bit
    assert_same(a[:, :-1], b[:, :-1])
    assert_differs(a[:, -1], b[:, -1], ops=1, reason="the last token changed")


@pytest.mark.parametrize("family", ["gpt2", "llama", "bart", "t5"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_generate_with_kv_cache_matches_recomputation(family, impl):
    model = tiny_model(family, attn=impl)
    torch.manual_seed(2)
    unipelt.attach(model, ALL_ATTENTION if family in ENCODER_DECODERS else GATED)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "unipelt_" in n):
            p.mul_(20)  # a strong prefix, so that a wrong cache or mask would change the tokens
    batch = tiny_batch(family, batch=2, padded=False)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**inputs, use_cache=True, **settings)
    recomputed = model.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached, recomputed)
    with unipelt.disabled(model):
        base = model.generate(**inputs, use_cache=True, **settings)
    assert not torch.equal(cached, base)


def test_fold_keeps_outputs_and_drops_the_mlp():
    model = tiny_model("bart")
    unipelt.attach(model, ALL_ATTENTION)
    batch = tiny_batch("bart")
    before = _logits(model, batch)
    counts_before = unipelt.count_parameters(model)
    unipelt.fold_prefixes(model)
    assert_same(_logits(model, batch), before)  # the folded vectors are what the MLP computed, by the same call
    counts_after = unipelt.count_parameters(model)
    assert counts_before["reparam"] > 0 and counts_after["reparam"] == 0
    assert counts_after["added"] == counts_before["added"]
    assert not any("reparam" in n for n, _ in model.named_parameters())
