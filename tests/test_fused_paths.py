"""The speed paths of the bottleneck form compute exactly what the plain path computes.

`Bottleneck.add_scaled_into` (up-projection, scale and residual add as one addmm) must equal h + s·form(x);
under autocast the form must not up-cast its input (that copy is what the fast path removes)."""

from __future__ import annotations

import pytest
import torch

from numerics import assert_close_scaled
from unipelt.compose import Composer
from unipelt.slot import Slot
from unipelt.forms.bottleneck import Bottleneck, matmul_input
from unipelt.spec import load_method


def _spec(**overrides):
    module = {"form": "bottleneck", "at": "ffn", "insertion": "parallel", "compose": "scale", "scale": 4.0,
              "dim": 8, "activation": "relu", "init": "bert"}
    module.update(overrides)
    if module["compose"] != "scale":
        module.pop("scale")
    return load_method({"name": "probe", "modules": [module]}).modules[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compose", [("scale", 4.0), ("add", 1.0)])
def test_fused_add_equals_plain_composition(bias, compose):
    kind, scale = compose
    spec = _spec(bias=bias, compose=kind)
    torch.manual_seed(0)
    form = Bottleneck(spec, 16, 24)
    slot = Slot(spec, form, Composer(spec, 16), "ffn")
    x, h = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 24, requires_grad=True)
    assert form.can_add_into(h)
    fused = slot(h, x)
    plain = h + scale * form(x)
    # one addmm (h + s·z·Wᵀ, then the bias) against up(z), the scale and the residual add, each rounded
    fused_reason = "h + s·(z·Wᵀ + b) as one addmm against up(z), ·s and + h rounded one by one"
    assert_close_scaled(fused, plain, ops=2, reason=fused_reason)
    grads_fused = torch.autograd.grad(fused.square().sum(), [x, h, *form.parameters()])
    grads_plain = torch.autograd.grad(plain.square().sum(), [x, h, *form.parameters()])
    for a, b in zip(grads_fused, grads_plain):
        assert_close_scaled(a, b, ops=2, reason=f"the backward of: {fused_reason}")


def test_output_layernorm_and_learned_scale_take_the_plain_path():
    normed = Bottleneck(_spec(layernorm="out"), 16, 24)
    assert not normed.can_add_into(torch.zeros(1, 24))
    learned = _spec(scale="learned")
    assert Composer(learned, 16).fixed_factor() is None
    assert Composer(_spec(), 16).fixed_factor() == 4.0


def test_no_upcast_under_autocast_and_bf16_result():
    form = Bottleneck(_spec(), 16, 24)  # fp32 weights
    with torch.no_grad():  # an adapter term as large as h, so that the comparison below sees it
        for param in form.parameters():
            param.normal_(std=0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert matmul_input(x, form.down.weight).dtype == torch.float32  # no autocast: the adapter's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_input(x, form.down.weight) is x
        h = torch.randn(2, 5, 24, dtype=torch.bfloat16)
        assert form.can_add_into(h)
        out = form.add_scaled_into(h, x, 4.0)
        reference = h.float() + 4.0 * form(x).float()
    assert out.dtype == torch.bfloat16
    # bf16: the fused path rounds h + 4·z·Wᵀ once; the reference rounds up(z) (its + h is in float32)
    assert_close_scaled(out.float(), reference, ops=2, dtype=torch.bfloat16,
                        reason="h + 4·z·Wᵀ rounded to bf16 once against up(z) rounded to bf16 then added in float32")
    # fp32 h under bf16 autocast would be down-cast by addmm: the plain path keeps h's dtype instead.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not form.can_add_into(torch.zeros(1, 24))
