"""Adapters under torch.compile: no graph break caused by adapter code, no recompilation on the next call, and
outputs and gradients equal to eager. Tolerances: 1e-5 relative / 1e-6 absolute in fp32 (the aot_eager backend
runs the same aten ops as eager, so only op-order rounding differs); 1e-4 / 1e-5 for inductor, which fuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import unipelt
from unipelt.attach import state_of
from tiny_models import perturb_adapters, tiny_batch, tiny_model

CASES = [(family, method) for family in ("llama", "bert") for method in ("lora", "mam")]


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
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(eager_grads)
    assert any("unipelt_" in name for name in grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


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
            torch.testing.assert_close(base, model(**batch).logits, rtol=1e-5, atol=1e-6)
        unipelt.merge(model)
        merged = compiled(**batch).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_forward_equals_eager():
    """The default backend (inductor, generated C++ on CPU) on tiny Llama with mam (prefix and bottleneck)."""
    batch = tiny_batch("llama")
    model = _prepared("llama", "mam").eval()
    with torch.no_grad():
        eager = model(**batch).logits
        torch._dynamo.reset()
        compiled = torch.compile(model)(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
