"""Two modules at one site compose in a documented order, whatever their YAML order: every parallel module adds
its Δh(x) to h first, then a sequential module sees that h (unipelt/slot.py, unipelt/attach.py)."""

from __future__ import annotations

import zlib

import torch

import unipelt
from numerics import assert_close_scaled, assert_differs, assert_same
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

SEQUENTIAL = {"form": "bottleneck", "name": "seq", "at": "ffn", "insertion": "sequential", "compose": "add", "dim": 4}
PARALLEL = {"form": "bottleneck", "name": "par", "at": "ffn", "insertion": "parallel", "compose": "scale",
            "scale": 2.0, "dim": 4}


def _attached(order: list[dict]):
    """The method attached in `order`, every adapter parameter set from its own name: the same weights either way."""
    model = tiny_model("bert")
    unipelt.attach(model, {"name": "shared", "modules": order})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_" in name:
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def test_yaml_order_at_a_shared_site_does_not_change_the_outputs():
    batch = tiny_batch("bert")
    with torch.no_grad():
        first = _attached([SEQUENTIAL, PARALLEL])(**batch).logits
        second = _attached([PARALLEL, SEQUENTIAL])(**batch).logits
    assert_same(first, second)  # the documented order: the same operations whichever order the YAML lists


def test_sequential_sees_h_with_the_parallel_delta_added():
    model = _attached([SEQUENTIAL, PARALLEL])
    layer = model.bert.encoder.layer[0]
    slots = {slot.spec.name: slot for name, slot in state_of(model).slots.items() if ".layer.0." in name}
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer.output.dense(layer.intermediate(x))  # the FFN sub-layer's h, through both slots' hooks
        with unipelt.disabled(model):
            h = layer.output.dense(layer.intermediate(x))
        after_parallel = h + 2.0 * slots["par"].form(x)
        expected = after_parallel + slots["seq"].form(after_parallel)
        other_order = (h + slots["seq"].form(h)) + 2.0 * slots["par"].form(x)
    by_hand = "h + 2·par(x), then + seq(·), by the slots' hooks against by hand"
    assert_close_scaled(got, expected, ops=2, reason=by_hand)
    assert_differs(got, other_order, ops=2, reason="the order is observable, so the test can fail")
