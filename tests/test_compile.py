"""Adapters under torch.compile: no graph break caused by adapter code, no recompilation on the next call, and
outputs and gradients equal to eager up to the rounding of what the compiler does differently (tests/numerics.py):
aot_eager runs aten ops eagerly but may decompose a composite op and sums gradient contributions in its own order;
inductor also fuses each layer's elementwise chains and writes its own reductions (norms, softmax)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import unipelt
from numerics import assert_close_scaled, assert_differs
from unipelt.attach import state_of
from tiny_models import perturb_adapters, tiny_batch, tiny_model

CASES = [(family, method) for family in ("llama", "bert") for method in ("lora", "mam")]
AOT_FORWARD = "aot_eager may decompose a composite op in each layer and in the head"
AOT_BACKWARD = f"{AOT_FORWARD}; it sums each layer's gradient contributions (q, k, v read one input) in its own order"


def _aot_ops(model, backward: bool = False) -> int:
    return (2 if backward else 1) * model.config.num_hidden_layers + 1


def _prepared(family: str, method: str | None):
    """A tiny model (dropout off, so eager and compiled runs are comparable) with its adapters moved off init."""
    model = tiny_model(family)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if method is not None:
        perturb_adapters(unipelt.attach(model, method))
    return model


_BASE_BREAKS: dict[str, int] = {}


def _base_breaks(family: str, batch) -> int:
    """transformers' own graph breaks in the bare model (they do not count against the adapters)."""
    if family not in _BASE_BREAKS:
        torch._dynamo.reset()
        _BASE_BREAKS[family] = torch._dynamo.explain(_prepared(family, None).train())(**batch).graph_break_count
    return _BASE_BREAKS[family]


def _train_outputs(model, batch, call=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = (call if call is not None else model)(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_compiled_training_step_equals_eager_without_new_graph_breaks(family, method):
    batch = tiny_batch(family)
    base_breaks = _base_breaks(family, batch)
    model = _prepared(family, method).train()
    eager_logits, eager_grads = _train_outputs(model, batch)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    _train_outputs(model, batch, compiled)
    breaks = sum(counters["graph_break"].values())
    assert breaks == base_breaks, dict(counters["graph_break"])
    # The hand-off of the captured sub-layer input must not survive the call (it would pin activations).
    assert all(getattr(slot, "captured_x", None) is None for slot in state_of(model).slots.values())
    with torch._dynamo.config.patch(error_on_recompile=True):  # the adapters' state keeps guards stable
        logits, grads = _train_outputs(model, batch, compiled)
    assert_close_scaled(logits, eager_logits, ops=_aot_ops(model), reason=AOT_FORWARD)
    assert set(grads) == set(eager_grads)
    assert any("unipelt_" in name for name in grads)
    for name, grad in eager_grads.items():
        assert_close_scaled(grads[name], grad, ops=_aot_ops(model, backward=True), reason=AOT_BACKWARD, msg=name)


def test_compiled_model_follows_disable_and_merge():
    """Switching adapters off (disabled) or merging them recompiles as needed and still matches eager."""
    batch = tiny_batch("llama")
    model = _prepared("llama", "lora").eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        adapted = compiled(**batch).logits
        with unipelt.disabled(model):
            base = compiled(**batch).logits
            assert_close_scaled(base, model(**batch).logits, ops=_aot_ops(model), reason=AOT_FORWARD)
        unipelt.merge(model)
        merged = compiled(**batch).logits
    # LoRA on q and v of each layer: the sum W + s·BA, and (W + s·BA)·x against W·x + s·B(A·x), there
    merge_ops = 2 * 2 * model.config.num_hidden_layers + _aot_ops(model)
    merge_reason = f"W + s·BA, and (W + s·BA)·x against W·x + s·B(A·x), at q and v of each layer; {AOT_FORWARD}"
    assert_differs(adapted, base, ops=merge_ops, reason="the adapters change the outputs (so merged = adapted "
                                                         "below says something)")
    assert_close_scaled(merged, adapted, ops=merge_ops, reason=merge_reason)


@pytest.mark.slow
def test_inductor_forward_equals_eager():
    """The default backend (inductor, generated C++ on CPU) on tiny Llama with mam (prefix and bottleneck)."""
    batch = tiny_batch("llama")
    model = _prepared("llama", "mam").eval()
    with torch.no_grad():
        eager = model(**batch).logits
        torch._dynamo.reset()
        compiled = torch.compile(model)(**batch).logits
    # per layer: 2 RMSNorms, rotary, attention with the prefix (QKᵀ, softmax, AV, the gate), the SiLU-gated FFN and
    # the parallel adapter, each fused or reduced by inductor's own code; then the final norm and the head
    assert_close_scaled(compiled, eager, ops=10 * model.config.num_hidden_layers + 2,
                        reason="inductor's fused elementwise chains and its own norm / softmax reductions")
