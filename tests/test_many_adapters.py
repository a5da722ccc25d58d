"""Many adapters on one model: every preset as a second adapter beside a LoRA on every family, held to what it does
alone (a copy of the same base with only that adapter, initialised from the same seed): outputs, one training
step, save and load under another name, deletion of its neighbour. Training one adapter never changes another,
bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import unipelt
from numerics import assert_same
from tiny_models import FAMILIES, has_biases, tiny_batch, tiny_model, perturb_adapter
from test_invariants import runs_other_adapters

PRESETS = unipelt.list_presets()
# A preset that runs other named adapters (AdapterFusion) needs them first: tests/test_composition_reference.py.
CASES = [(family, preset) for family in FAMILIES for preset in PRESETS
         if not (preset == "bitfit" and not has_biases(family)) and preset not in ("full",)
         and not runs_other_adapters(preset)]


def outputs(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def attach_seeded(model, method, name, seed):
    torch.manual_seed(seed)
    unipelt.attach(model, method, name=name)


def train_step(model, batch, name=None) -> None:
    model.train()
    groups = unipelt.param_groups(model, 1e-2, name=name)
    optimizer = torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.05)
    optimizer.zero_grad()
    out = model(**batch)
    loss = out.loss if out.loss is not None else out.logits.float().pow(2).mean()
    extra = unipelt.regularization_loss(model, name=name)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    optimizer.step()
    unipelt.on_optimizer_step(model, 1, 10, name=name)
    model.eval()


def adapter_tensors(model, name) -> dict[str, torch.Tensor]:
    from unipelt.io import adapter_state
    return adapter_state(model, name)


@pytest.mark.parametrize("family,preset", CASES)
def test_second_adapter_beside_a_lora(family, preset, tmp_path):
    first = "qlora" if preset == "qlora" else "lora"  # adapters of one model share one base: both 4-bit or neither
    base = tiny_model(family)
    batch = tiny_batch(family)
    alone_first, alone_second, both = (copy.deepcopy(base) for _ in range(3))
    attach_seeded(alone_first, first, None, 1)
    perturb_adapter(alone_first, "default", 11)
    attach_seeded(alone_second, preset, None, 2)
    perturb_adapter(alone_second, "default", 12)

    attach_seeded(both, first, "first", 1)
    perturb_adapter(both, "first", 11)
    attach_seeded(both, preset, "second", 2)
    perturb_adapter(both, "second", 12)
    assert unipelt.list_adapters(both) == ["first", "second"]
    assert unipelt.active_adapters(both) == "second"
    assert_same(outputs(both, batch), outputs(alone_second, batch))
    unipelt.set_active(both, "first")
    assert_same(outputs(both, batch), outputs(alone_first, batch))

    # Train the second adapter one step: the same step alone gives the same adapter; the first one does not move.
    unipelt.set_active(both, "second")
    before_first = adapter_tensors(both, "first")
    with torch.random.fork_rng():
        torch.manual_seed(5)
        train_step(both, batch, "second")
    with torch.random.fork_rng():
        torch.manual_seed(5)
        train_step(alone_second, batch)
    for key, value in adapter_tensors(both, "first").items():
        assert torch.equal(value, before_first[key]), key
    trained = adapter_tensors(both, "second")
    for key, value in adapter_tensors(alone_second, None).items():
        assert_same(trained[key], value, key)
    assert_same(outputs(both, batch), outputs(alone_second, batch))
    unipelt.set_active(both, "first")
    assert_same(outputs(both, batch), outputs(alone_first, batch))

    # Save both, load both into a fresh copy of the base under other names.
    unipelt.save_adapter(both, tmp_path / "first", name="first")
    unipelt.save_adapter(both, tmp_path / "second", name="second")
    loaded = copy.deepcopy(base)
    unipelt.load_adapter(loaded, tmp_path / "second", name="x")
    unipelt.load_adapter(loaded, tmp_path / "first", name="y")
    assert unipelt.active_adapters(loaded) == "y"
    assert_same(outputs(loaded, batch), outputs(alone_first, batch))
    unipelt.set_active(loaded, "x")
    assert_same(outputs(loaded, batch), outputs(alone_second, batch))

    # Delete the first: the second alone remains, as it is alone.
    unipelt.delete_adapter(both, "first")
    assert unipelt.list_adapters(both) == ["second"]
    assert_same(outputs(both, batch), outputs(alone_second, batch))
