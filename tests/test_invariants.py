"""The shared tester: every preset on a tiny random model of every family must satisfy the same invariants."""

from __future__ import annotations

import pytest
import torch

import unipelt
from tiny_models import FAMILIES, has_biases, tiny_batch, tiny_model

PRESETS = unipelt.list_presets()
# Presets whose every up-projection starts at zero: the attached model equals the base model at init. (mh_pa is
# He et al.'s ReLU prefix: its prefix vectors are not zero at init, so it is not the identity there.)
IDENTITY_AT_INIT = {"lora", "scaled_pa", "bitfit", "full", "adalora", "ia3"}
# Every module folds into the weights (no "unmerged" warning).
FULLY_MERGEABLE = {"lora", "adalora", "ia3"}
# The base itself changes at attach (4-bit NF4): "disabled" is the quantized base, and merging requantizes.
# Both are tested against their own references in test_qlora.py.
QUANTIZED = {p for p in PRESETS if unipelt.load_method(p).quantize != "none"}
# Families without biases (T5, Llama, Gemma): bitfit is refused there (see test_bad_input).
BIASED = {family for family in FAMILIES if has_biases(family)}
CASES = [(family, preset) for family in FAMILIES for preset in PRESETS
         if not (preset == "bitfit" and family not in BIASED)]


def _outputs(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _train_steps(model, batch, steps: int = 3) -> None:
    """A few AdamW steps with a large learning rate so that every adapter moves away from its init."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(params=CASES, ids=[f"{f}-{p}" for f, p in CASES])
def case(request):
    family, preset = request.param
    return family, preset, tiny_model(family), tiny_batch(family)


def test_counts_from_forms_equal_counts_of_the_attached_modules(case):
    """Each form's Appendix-B formula (counted from placements, nothing attached) equals what attach builds."""
    family, preset, model, batch = case
    formula = unipelt.count_parameters(model, preset)
    assert not unipelt.is_attached(model)
    unipelt.attach(model, preset)
    attached = unipelt.count_parameters(model)
    for key in ("added", "reparam", "trainable", "trained_base", "head", "base"):
        assert formula[key] == attached[key], key


def test_forward_backward_reach_every_adapter(case):
    family, preset, model, batch = case
    unipelt.attach(model, preset)
    model.train()
    model(**batch).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    # Every added parameter, frozen or not: a frozen adapter (requires_grad False) has no gradient and fails here.
    added = [(n, p) for n, p in model.named_parameters() if "unipelt_" in n]
    assert added or preset in ("full", "bitfit")
    for name, param in added:
        assert param.grad is not None, name


def test_detach_restores_bit_for_bit(case):
    family, preset, model, batch = case
    base_out = _outputs(model, batch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    unipelt.attach(model, preset)
    _perturb_adapters(model)
    unipelt.detach(model)
    assert not unipelt.is_attached(model)
    state = model.state_dict()
    assert set(state) == set(base_state)
    assert all(torch.equal(value, base_state[key]) for key, value in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == base_flags
    assert torch.equal(_outputs(model, batch), base_out)


def _perturb_adapters(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_" in name:
                param.add_(torch.randn_like(param) * 0.1)


def _head_keys(model) -> set[str]:
    base_ids = {id(p) for p in model.base_model.parameters()}
    return {n for n, p in model.named_parameters() if id(p) not in base_ids}


def test_disabled_is_exactly_the_base_model(case):
    family, preset, model, batch = case
    if preset in ("full", "bitfit"):
        pytest.skip("no added module to disable")
    if preset in QUANTIZED:
        pytest.skip("quantized base: disabled equals the 4-bit base, tested in test_qlora.py")
    base_out = _outputs(model, batch)
    unipelt.attach(model, preset)
    _perturb_adapters(model)  # make sure the modules do change the output
    assert not torch.allclose(_outputs(model, batch), base_out)
    with unipelt.disabled(model):
        assert torch.equal(_outputs(model, batch), base_out)
    unipelt.detach(model)
    assert torch.equal(_outputs(model, batch), base_out)


def test_identity_at_init(case):
    family, preset, model, batch = case
    if preset not in IDENTITY_AT_INIT:
        pytest.skip("this preset's modules do not start at zero")
    base_out = _outputs(model, batch)
    unipelt.attach(model, preset)
    assert torch.equal(_outputs(model, batch), base_out)


def test_mam_parallel_adapter_is_identity_at_init(case):
    family, preset, model, batch = case
    if preset != "mam":
        pytest.skip("MAM only")
    spec = unipelt.load_method("mam").to_dict()
    spec["modules"] = [m for m in spec["modules"] if m["form"] == "bottleneck"]
    base_out = _outputs(model, batch)
    unipelt.attach(model, spec)
    assert torch.equal(_outputs(model, batch), base_out)


def test_only_adapters_and_head_change(case):
    family, preset, model, batch = case
    unipelt.attach(model, preset)
    # After attach (a quantized base replaces its weights there); adapters are checked to move below.
    snapshot = _snapshot(model)
    before = {n: p for n, p in snapshot.items() if "unipelt_" not in n}
    _train_steps(model, batch)
    head = _head_keys(model)
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    if preset == "full":
        assert changed
    elif preset == "bitfit":
        assert changed and all(n.endswith("bias") or n in head for n in changed)
    elif unipelt.load_method(preset).train_base == "layernorm":  # Houlsby: the base LayerNorms train too
        norms = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}
        assert changed and all(n.rpartition(".")[0] in norms or n in head for n in changed)
    else:
        assert changed <= head, sorted(changed - head)[:3]
        # Every added tensor must have changed in training (not merely be non-zero): a frozen adapter stays put.
        added = {n: p for n, p in model.named_parameters() if "unipelt_" in n}
        assert added
        still = sorted(n for n, p in added.items() if torch.equal(p, snapshot[n]))
        assert not still, still[:3]


def test_save_load_round_trip(case, tmp_path):
    family, preset, model, batch = case
    unipelt.attach(model, preset)
    _train_steps(model, batch)
    trained_out = _outputs(model, batch)
    unipelt.save_adapter(model, tmp_path)
    fresh = tiny_model(family)  # same seed: the same base weights, a different object
    unipelt.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_outputs(fresh, batch), trained_out, rtol=0, atol=1e-6)


def test_merge_matches_and_unmerge_restores(case):
    family, preset, model, batch = case
    if preset in ("full", "bitfit"):
        pytest.skip("nothing to merge")
    unipelt.attach(model, preset)
    _train_steps(model, batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "unipelt_" not in n}
    unmerged_out = _outputs(model, batch)
    if preset in QUANTIZED:
        pytest.skip("merging into a 4-bit base requantizes (rounding); tested in test_qlora.py")
    with pytest.warns(UserWarning, match="unmerged") if preset not in FULLY_MERGEABLE else _nothing():
        report = unipelt.merge(model)
    if preset in FULLY_MERGEABLE:
        assert report["merged"] and not report["unmerged"]
    # Tolerance: merging re-associates (W + s·BA)x vs Wx + s·B(Ax) in float32.
    torch.testing.assert_close(_outputs(model, batch), unmerged_out, rtol=1e-5, atol=1e-5)
    unipelt.unmerge(model)
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
    # Unmerge subtracts what merge added: equal up to float32 rounding of W + ΔW − ΔW.
    torch.testing.assert_close(_outputs(model, batch), unmerged_out, rtol=1e-5, atol=1e-5)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
