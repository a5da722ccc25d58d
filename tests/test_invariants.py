"""The shared tester: every preset on a tiny random model of every family must satisfy the same invariants.

What a preset should do is read from what its forms declare, never from a list of preset names here: a new
preset (or a new form) is picked up and held to its own declarations with no edit to this file. The checks are
plain functions of (model, batch, method), so a test elsewhere can run the whole tester on a method of its own
(`run_shared_tester`; tests/test_form_contract.py does so for a toy form)."""

from __future__ import annotations

import pytest
import torch

import unipelt
from numerics import assert_close_scaled, assert_differs, assert_same
from tiny_models import FAMILIES, has_biases, tiny_batch, tiny_model
from unipelt.forms import form_of

PRESETS = unipelt.list_presets()
# Families without biases (T5, Llama, Gemma): bitfit is refused there (see test_bad_input).
BIASED = {family for family in FAMILIES if has_biases(family)}


def runs_other_adapters(method) -> bool:
    """A module that runs named adapters attached before it (AdapterFusion's members) cannot be attached alone; its
    own tests attach its members first (tests/test_composition_reference.py runs these checks there)."""
    return any(form_of(m.form).uses_adapters(m) for m in unipelt.load_method(method).modules)


CASES = [(family, preset) for family in FAMILIES for preset in PRESETS
         if not (preset == "bitfit" and family not in BIASED) and not runs_other_adapters(preset)]


def quantized(method) -> bool:
    """The base itself changes at attach (4-bit NF4): "disabled" is the quantized base and merging requantizes;
    both are tested against their own references in test_qlora.py."""
    return unipelt.load_method(method).quantize != "none"


def starts_as_identity(method) -> bool:
    """Every module declares that it starts at zero (and the base is not quantized): attach changes no output."""
    spec = unipelt.load_method(method)
    return not quantized(spec) and all(form_of(m.form).starts_as_identity(m) for m in spec.modules)


def fully_mergeable(method) -> bool:
    """Every module declares that merge() folds it on every family (no "unmerged" warning)."""
    spec = unipelt.load_method(method)
    return bool(spec.modules) and all(form_of(m.form).merges(m) for m in spec.modules)


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


# ---- the checks: each takes a fresh tiny model, its batch and a method (preset name, dict or spec) --------------

def check_counts(model, batch, method) -> None:
    """Each form's Appendix-B formula (counted from placements, nothing attached) equals what attach builds."""
    formula = unipelt.count_parameters(model, method)
    assert not unipelt.is_attached(model)
    unipelt.attach(model, method)
    attached = unipelt.count_parameters(model)
    for key in ("added", "reparam", "trainable", "trained_base", "head", "base"):
        assert formula[key] == attached[key], key


def check_gradients_reach_every_adapter(model, batch, method) -> None:
    unipelt.attach(model, method)
    model.train()
    model(**batch).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    # Every added parameter, frozen or not: a frozen adapter (requires_grad False) has no gradient and fails here.
    added = [(n, p) for n, p in model.named_parameters() if "unipelt_" in n]
    assert added or not unipelt.load_method(method).modules
    for name, param in added:
        assert param.grad is not None, name


def check_detach_restores_bit_for_bit(model, batch, method) -> None:
    base_out = _outputs(model, batch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    unipelt.attach(model, method)
    _perturb_adapters(model)
    unipelt.detach(model)
    assert not unipelt.is_attached(model)
    state = model.state_dict()
    assert set(state) == set(base_state)
    assert all(torch.equal(value, base_state[key]) for key, value in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == base_flags
    assert_same(_outputs(model, batch), base_out)


def _perturb_adapters(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_" in name:
                param.add_(torch.randn_like(param) * 0.1)


def _head_keys(model) -> set[str]:
    base_ids = {id(p) for p in model.base_model.parameters()}
    return {n for n, p in model.named_parameters() if id(p) not in base_ids}


def check_disabled_is_exactly_the_base_model(model, batch, method) -> None:
    if not unipelt.load_method(method).modules or quantized(method):
        return  # nothing added to disable; a quantized base is its own reference (test_qlora.py)
    base_out = _outputs(model, batch)
    unipelt.attach(model, method)
    _perturb_adapters(model)  # make sure the modules do change the output
    assert_differs(_outputs(model, batch), base_out, ops=1, reason="the perturbed modules change the outputs")
    with unipelt.disabled(model):
        assert_same(_outputs(model, batch), base_out)
    unipelt.detach(model)
    assert_same(_outputs(model, batch), base_out)


def check_identity_at_init(model, batch, method) -> None:
    """A method whose forms all declare they start as the identity gives exactly the base outputs after attach."""
    if not starts_as_identity(method):
        return
    base_out = _outputs(model, batch)
    unipelt.attach(model, method)
    assert_same(_outputs(model, batch), base_out)


def check_only_adapters_and_head_change(model, batch, method) -> None:
    spec = unipelt.load_method(method)
    unipelt.attach(model, method)
    # After attach (a quantized base replaces its weights there); adapters are checked to move below.
    snapshot = _snapshot(model)
    before = {n: p for n, p in snapshot.items() if "unipelt_" not in n}
    _train_steps(model, batch)
    head = _head_keys(model)
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    if spec.train_base == "all":
        assert changed
    elif spec.train_base == "bias":
        assert changed and all(n.endswith("bias") or n in head for n in changed)
    elif spec.train_base == "layernorm":  # Houlsby: the base LayerNorms train too
        norms = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}
        assert changed and all(n.rpartition(".")[0] in norms or n in head for n in changed)
    else:
        assert changed <= head, sorted(changed - head)[:3]
    if spec.modules:
        # Every added tensor must have changed in training (not merely be non-zero): a frozen adapter stays put.
        added = {n: p for n, p in model.named_parameters() if "unipelt_" in n}
        assert added
        still = sorted(n for n, p in added.items() if torch.equal(p, snapshot[n]))
        assert not still, still[:3]


def check_save_load_round_trip(model, batch, method, tmp_path, fresh_model) -> None:
    unipelt.attach(model, method)
    _train_steps(model, batch)
    folded_aids = unipelt.count_parameters(model)["reparam"] > 0
    trained_out = _outputs(model, batch)
    unipelt.save_adapter(model, tmp_path)
    fresh = fresh_model()  # same seed: the same base weights, a different object
    unipelt.load_adapter(fresh, tmp_path)
    if folded_aids:  # a prefix MLP / prompt encoder runs once at save: its vectors come out of other matmul shapes
        assert_close_scaled(_outputs(fresh, batch), trained_out, ops=4,
                            reason="the folded training aid's vectors computed once at save vs in each forward")
    else:  # the same tensors go through the same operations
        assert_same(_outputs(fresh, batch), trained_out)


def check_merge_matches_and_unmerge_restores(model, batch, method) -> None:
    if not unipelt.load_method(method).modules or quantized(method):
        return  # nothing to merge; merging into a 4-bit base requantizes (rounding): tested in test_qlora.py
    unipelt.attach(model, method)
    _train_steps(model, batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "unipelt_" not in n}
    unmerged_out = _outputs(model, batch)
    mergeable = fully_mergeable(method)
    with pytest.warns(UserWarning, match="unmerged") if not mergeable else _nothing():
        report = unipelt.merge(model)
    if mergeable:
        assert report["merged"] and not report["unmerged"]
    merged_out = _outputs(model, batch)
    # merging re-associates (W + s·ΔW)x vs Wx + s·ΔWx, and every later layer carries the difference on
    assert_close_scaled(merged_out, unmerged_out, ops=max(1, 2 * len(report["merged"])),
                        reason="the sum W + s·ΔW, and (W + s·ΔW)·x against W·x + s·ΔW·x, at each merged slot")
    unipelt.unmerge(model)
    for name, param in model.named_parameters():
        if name in weights:  # the fold keeps a copy of what it changed: unmerge puts back the original bits
            assert_same(param.detach(), weights[name], msg=name)
    assert_same(_outputs(model, batch), unmerged_out)


INVARIANTS = [check_counts, check_gradients_reach_every_adapter, check_detach_restores_bit_for_bit,
              check_disabled_is_exactly_the_base_model, check_identity_at_init, check_only_adapters_and_head_change,
              check_merge_matches_and_unmerge_restores]


def run_shared_tester(family: str, method, tmp_path) -> None:
    """Every invariant for one method on one family's tiny model (a fresh model for each check)."""
    for check in INVARIANTS:
        check(tiny_model(family), tiny_batch(family), method)
    check_save_load_round_trip(tiny_model(family), tiny_batch(family), method, tmp_path,
                               lambda: tiny_model(family))


# ---- every preset on every family ------------------------------------------------------------------------------

def test_counts_from_forms_equal_counts_of_the_attached_modules(case):
    family, preset, model, batch = case
    check_counts(model, batch, preset)


def test_forward_backward_reach_every_adapter(case):
    family, preset, model, batch = case
    check_gradients_reach_every_adapter(model, batch, preset)


def test_detach_restores_bit_for_bit(case):
    family, preset, model, batch = case
    check_detach_restores_bit_for_bit(model, batch, preset)


def test_disabled_is_exactly_the_base_model(case):
    family, preset, model, batch = case
    check_disabled_is_exactly_the_base_model(model, batch, preset)


def test_identity_at_init(case):
    family, preset, model, batch = case
    check_identity_at_init(model, batch, preset)


def test_mam_parallel_adapter_is_identity_at_init(case):
    family, preset, model, batch = case
    if preset != "mam":
        pytest.skip("MAM only")
    spec = unipelt.load_method("mam").to_dict()
    spec["modules"] = [m for m in spec["modules"] if m["form"] == "bottleneck"]
    base_out = _outputs(model, batch)
    unipelt.attach(model, spec)
    assert_same(_outputs(model, batch), base_out)


def test_only_adapters_and_head_change(case):
    family, preset, model, batch = case
    check_only_adapters_and_head_change(model, batch, preset)


def test_save_load_round_trip(case, tmp_path):
    family, preset, model, batch = case
    check_save_load_round_trip(model, batch, preset, tmp_path, lambda: tiny_model(family))


def test_merge_matches_and_unmerge_restores(case):
    family, preset, model, batch = case
    check_merge_matches_and_unmerge_restores(model, batch, preset)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
