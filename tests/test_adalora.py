"""AdaLoRA (svd form + rank allocator): the budget schedule driven only through the unipelt.optim contract,
masking of pruned triplets, the orthogonal regulariser, save/load with pruned shapes, merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import unipelt
from numerics import assert_close_scaled, assert_differs, assert_same
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

TOTAL_STEPS, TINIT, TFINAL, INIT_R, TARGET_R = 14, 2, 4, 6, 2
SITES = ["attn.q", "attn.v", "ffn.down"]


def _method(**changes) -> dict:
    module = dict(form="svd", at=SITES, insertion="parallel", compose="scale", scale=2.0, init_r=INIT_R,
                  target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, delta_t=1, orth_reg_weight=0.1)
    module.update(changes)
    return {"name": "ada", "modules": [module]}


def _svd_forms(model) -> dict:
    state = state_of(model)
    return {name: slot.form for name, slot in state.slots.items()}


def _expected_budget(step: int, n_matrices: int) -> int:
    """Zhang et al. eq. 12, written out independently of the allocator."""
    b0, bT = INIT_R * n_matrices, TARGET_R * n_matrices
    if step <= TINIT:
        return b0
    if step >= TOTAL_STEPS - TFINAL:
        return bT
    fraction = (step - TINIT) / (TOTAL_STEPS - TFINAL - TINIT)
    return int(bT + (b0 - bT) * (1 - fraction) ** 3)


def _train(model, batch, steps: int = TOTAL_STEPS) -> list[dict]:
    """A plain training loop that knows nothing about AdaLoRA: only the unipelt.optim contract."""
    optimizer = torch.optim.AdamW(unipelt.param_groups(model, lr=1e-2))
    model.train()
    logged = []
    for step in range(1, steps + 1):
        loss = model(**batch).loss + unipelt.regularization_loss(model)
        loss.backward()
        optimizer.step()
        unipelt.on_optimizer_step(model, step, steps)
        optimizer.zero_grad()
        logged.append(unipelt.training_metrics(model))
    model.eval()
    return logged


@pytest.fixture(scope="module")
def trained():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    unipelt.attach(model, _method())
    return model, batch, _train(model, batch)


def test_total_rank_follows_the_cubic_schedule_and_ends_at_target(trained):
    model, batch, logged = trained
    n_matrices = len(SITES) * 2  # two layers
    key = "unipelt_m0_rank_allocator/total_rank"
    ranks = [int(entry[key]) for entry in logged]
    expected = [_expected_budget(step, n_matrices) for step in range(1, TOTAL_STEPS + 1)]
    assert ranks == expected
    assert ranks[0] == INIT_R * n_matrices and ranks[-1] == TARGET_R * n_matrices
    assert any(TARGET_R * n_matrices < r < INIT_R * n_matrices for r in ranks)  # the curve, not a jump
    assert unipelt.count_parameters(model)["svd_rank"] == TARGET_R * n_matrices


def test_pruned_triplets_contribute_nothing(trained):
    model, batch, _ = trained
    reference = model(**batch).logits
    forms = _svd_forms(model)
    with torch.no_grad():
        for form in forms.values():
            pruned = ~form.rank_mask
            form.left[:, pruned] += 1.0
            form.singular[pruned] += 1.0
            form.right[pruned] += 1.0
    assert_same(model(**batch).logits, reference)  # a pruned triplet is multiplied by an exact 0
    kept_form = next(f for f in forms.values() if f.rank_mask.any())
    with torch.no_grad():
        kept_form.singular[kept_form.rank_mask] += 1.0
    assert_differs(model(**batch).logits, reference, ops=1, reason="a kept λ moved by 1")
    with torch.no_grad():
        kept_form.singular[kept_form.rank_mask] -= 1.0
        for form in forms.values():
            pruned = ~form.rank_mask
            form.left[:, pruned] -= 1.0
            form.singular[pruned] -= 1.0
            form.right[pruned] -= 1.0


def test_orthogonal_regulariser_matches_hand_computation():
    """γ · mean over the P and Q matrices of the unsquared ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F (the reference code's form)."""
    model = tiny_model("bert")
    unipelt.attach(model, _method(orth_reg_weight=0.3))
    forms = _svd_forms(model)
    norms = []
    for form in forms.values():
        P, Q = form.left.detach().double(), form.right.detach().double()
        for gram in (P.T @ P, Q @ Q.T):
            norms.append(sum((gram[i, j] - float(i == j)) ** 2 for i in range(INIT_R) for j in range(INIT_R)) ** 0.5)
    assert len(norms) == 2 * len(forms)
    # float32 Gram product, its sum of squares and the root against the same in float64, term by term
    assert_close_scaled(unipelt.regularization_loss(model).item(), 0.3 * float(sum(norms)) / len(norms), ops=3,
                        dtype=torch.float32, reason="float32 PᵀP, sum of squares and root vs float64 by hand")
    with torch.no_grad():  # orthonormal P and Q: the regulariser vanishes
        for form in forms.values():
            form.left.copy_(torch.linalg.qr(torch.randn(form.left.shape))[0])
            form.right.copy_(torch.linalg.qr(torch.randn(form.right.shape[1], INIT_R))[0].T)
    # zero up to float32 rounding of the QR and the Gram product, whose terms are of the identity's size (1); the
    # unsquared norm of INIT_R² such errors is at most INIT_R times the largest
    assert_close_scaled(unipelt.regularization_loss(model).item(), 0.0, ops=2 * INIT_R, dtype=torch.float32,
                        scale=1.0, reason="float32 QR and PᵀP of orthonormal factors against the exact identity")


def test_save_load_builds_pruned_shapes_with_identical_outputs(trained, tmp_path):
    model, batch, _ = trained
    out = model(**batch).logits
    unipelt.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "unipelt_adapter.json").read_text())
    pattern = meta["method"]["modules"][0]["rank_pattern"]
    forms = _svd_forms(model)
    assert sum(pattern.values()) == TARGET_R * len(forms)
    assert sorted(pattern) == sorted(f"encoder.{layer}.{site}" for layer in (0, 1) for site in SITES)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, form in forms.items():
        assert tensors[f"{name}.form.singular"].shape == (form.effective_rank,)
        assert tensors[f"{name}.form.left"].shape == (form.left.shape[0], form.effective_rank)
    fresh = tiny_model("bert")
    unipelt.load_adapter(fresh, tmp_path)
    fresh_forms = _svd_forms(fresh)
    assert {n: f.rank for n, f in fresh_forms.items()} == {n: f.effective_rank for n, f in forms.items()}
    # the pruned triplets are gone: each of the 6 products P·diag(λ)·Q·x sums over fewer terms
    assert_close_scaled(fresh(**batch).logits, out, ops=len(forms),
                        reason="P·diag(λ)·Q·x over the kept triplets only vs over all with the pruned ones zeroed")
    counts = unipelt.count_parameters(fresh)
    kept = sum(f.rank * (f.left.shape[0] + f.right.shape[1] + 1) for f in fresh_forms.values())
    assert counts["added"] == kept == unipelt.count_parameters(model)["added"]
    # A loaded (pruned) adapter has no allocator: further steps leave the pattern alone.
    _train(fresh, batch, steps=3)
    assert {n: f.effective_rank for n, f in _svd_forms(fresh).items()} == {n: f.rank for n, f in fresh_forms.items()}


def test_merge_folds_the_pruned_update(trained):
    model, batch, _ = trained
    out = model(**batch).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "unipelt_" not in n}
    report = unipelt.merge(model)
    assert len(report["merged"]) == len(_svd_forms(model)) and not report["unmerged"]
    assert_close_scaled(model(**batch).logits, out, ops=2 * len(report["merged"]),
                        reason="the sum W + s·PΛQ, and its product with x against W·x + s·P(λ⊙Qx), at each "
                               "merged projection")
    unipelt.unmerge(model)
    for name, param in model.named_parameters():
        if name in weights:  # unmerge puts back the weights merge() kept, not W + ΔW − ΔW
            assert_same(param.detach(), weights[name], msg=name)


def test_bad_options_are_refused_before_anything_changes():
    with pytest.raises(unipelt.MethodConfigError, match="target_r"):
        unipelt.load_method(_method(target_r=INIT_R + 1))
    with pytest.raises(unipelt.MethodConfigError, match="tinit"):
        unipelt.load_method(_method(tinit=1.5))
    with pytest.raises(unipelt.MethodConfigError, match="compose"):
        unipelt.load_method(_method(compose="gate"))
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(unipelt.AttachError, match="rank_pattern key 'encoder.9.attn.q'"):
        unipelt.attach(model, _method(rank_pattern={"encoder.9.attn.q": 1}))
    assert not unipelt.is_attached(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_importance_is_smoothed_sensitivity_times_uncertainty_and_masking_keeps_the_top_triplets():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    unipelt.attach(model, _method(tinit=100))  # no masking during the schedule's warm-up
    forms = _svd_forms(model)
    with torch.no_grad():
        for form in forms.values():
            form.singular.normal_()  # λ = 0 at init would make every sensitivity of P and Q zero
    model.train()
    model(**batch).loss.backward()
    unipelt.on_optimizer_step(model, 1, TOTAL_STEPS + 200)
    allocator = state_of(model).controllers["unipelt_m0_rank_allocator"]
    beta1, beta2 = 0.85, 0.85
    hand = []
    for form in forms.values():
        def score(param):
            sensitivity = (param * param.grad).abs()
            smoothed = (1 - beta1) * sensitivity  # Ī after one step from zero
            uncertainty = (1 - beta2) * (sensitivity - smoothed).abs()
            return smoothed * uncertainty
        triplet = score(form.singular) + score(form.left).mean(dim=0) + score(form.right).mean(dim=1)
        # the allocator's running averages start at zero: β·0 + (1 − β)·s; the sum of three terms in any order
        assert_close_scaled(allocator.triplet_scores(form), triplet.detach(), ops=4,
                            reason="two running averages from zero vs (1 − β)·s; the three-term sum's order")
        hand.append(triplet.detach())
    budget = 7
    allocator.mask_to(budget)
    flat = torch.cat(hand)
    kept = torch.cat([form.rank_mask for form in forms.values()])
    assert int(kept.sum()) == budget
    assert flat[kept].min() >= flat[~kept].max()
