"""AdaLoRA against PEFT's AdaLoRA (an independent implementation of the reference code) on the same weights:
the orthogonal regulariser, the importance scores after every step, which λ are zeroed at each masking step
(pruned triplets can come back), and the outputs after the same gradient steps. float64 on both sides, so that
near-equal scores cannot order differently through rounding alone. PEFT divides its scale by ranknum + 1e-5 where
the reference code (and unipelt) divide by r (docs/fidelity.md); PEFT's ranknum is set to r − 1e-5 here, so that
the two compute the same function and differ by rounding only."""

from __future__ import annotations

import pytest
import torch

import unipelt
from numerics import assert_close_scaled
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

peft = pytest.importorskip("peft")

TOTAL, TINIT, TFINAL, DELTA_T, INIT_R, TARGET_R, ALPHA, GAMMA = 12, 2, 4, 2, 6, 2, 8.0, 0.1
SITES = {"attn.q": "query", "attn.v": "value", "ffn.up": "intermediate.dense"}
# Rounding that may differ per training step: the forward and the backward through each adapted projection of the
# two layers (ours scales P(λ⊙Qx) by α/r, PEFT multiplies by α and divides by r); step t compares after t − 1
# updates, each of which carries the previous differences on.
TRAJECTORY_OPS = 2 * len(SITES) * 2
TRAJECTORY = "ΔW·x scaled as α/r vs ·α/r at each adapted projection, forward and backward, once per step so far"


def _ours():
    model = tiny_model("bert").double()
    method = {"name": "ada", "train_head": False, "modules": [dict(
        form="svd", at=list(SITES), insertion="parallel", compose="scale", alpha=ALPHA, init_r=INIT_R,
        target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, delta_t=DELTA_T, orth_reg_weight=GAMMA)]}
    return unipelt.attach(model, method)


def _peft():
    config = peft.AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T,
                                beta1=0.85, beta2=0.85, orth_reg_weight=GAMMA, total_step=TOTAL, lora_alpha=ALPHA,
                                lora_dropout=0.0, target_modules=list(SITES.values()))
    model = peft.get_peft_model(tiny_model("bert").double(), config)
    for name, param in model.named_parameters():
        if "ranknum" in name:  # PEFT's constant r (a Parameter it leaves trainable): not a trained weight
            param.requires_grad_(False)
            with torch.no_grad():  # its scale / (ranknum + 1e-5) becomes the reference's scale / r, exactly
                param.sub_(1e-5)
            assert torch.equal(param + 1e-5, torch.full_like(param, float(INIT_R)))
    return model


def _pairs(ours, theirs) -> list:
    """(our svd form, PEFT's AdaLoRA layer) for each placement; our random P, Q and a random λ copied into both."""
    state = state_of(ours)
    inner = theirs.base_model.model
    generator = torch.Generator().manual_seed(5)
    pairs = []
    for placement in state.placements:
        form = state.slots[f"{placement.host_name}.{placement.slot_name}"].form
        layer = inner.get_submodule(placement.h_name)
        with torch.no_grad():
            form.singular.copy_(0.05 * torch.randn(form.rank, generator=generator, dtype=torch.float64))
            layer.lora_A["default"].copy_(form.right)
            layer.lora_B["default"].copy_(form.left)
            layer.lora_E["default"].copy_(form.singular[:, None])
        pairs.append((form, layer))
    return pairs


def _peft_triplet_scores(theirs, layer) -> torch.Tensor:
    """Zhang et al.'s S_i from PEFT's smoothed sensitivity and uncertainty (eq. 11)."""
    allocator = theirs.base_model.rankallocator
    names = {id(p): n for n, p in theirs.base_model.model.named_parameters()}

    def score(param):
        name = names[id(param)]
        return allocator.exp_avg_ipt[name] * allocator.exp_avg_unc[name]

    return (score(layer.lora_E["default"]).flatten() + score(layer.lora_A["default"]).mean(dim=1)
            + score(layer.lora_B["default"]).mean(dim=0))


def test_adalora_matches_peft_step_by_step():
    ours, theirs = _ours(), _peft()
    pairs = _pairs(ours, theirs)
    batch = tiny_batch("bert")
    allocator = state_of(ours).controllers["unipelt_m0_rank_allocator"]
    optimizers = [torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
                  for model in (ours, theirs)]
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    came_back = False
    zeroed = [torch.zeros(form.rank, dtype=torch.bool) for form, _ in pairs]
    for step in range(1, TOTAL + 1):
        out = ours(**batch)  # both in eval mode: no dropout, so the two forwards see the same function
        regulariser = unipelt.regularization_loss(ours)
        their_out = theirs.base_model(**batch)  # AdaLoraModel.forward adds the regulariser to the loss
        their_regulariser = their_out.loss - torch.nn.functional.cross_entropy(their_out.logits, batch["labels"])
        assert_close_scaled(out.logits, their_out.logits, ops=TRAJECTORY_OPS * step, reason=TRAJECTORY)
        # theirs is read back as loss − cross-entropy: rounding at the loss's magnitude
        assert_close_scaled(regulariser, their_regulariser, ops=TRAJECTORY_OPS * step + 1,
                            scale=float(their_out.loss.detach()),
                            reason=f"{TRAJECTORY}; PEFT's regulariser read as loss − cross-entropy")
        (out.loss + regulariser).backward()
        their_out.loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        # λ zeroed at the last masking step moved again: the triplet kept its gradient (not hard-masked)
        came_back |= any(bool((was & (form.singular.detach() != 0)).any()) for (form, _), was in zip(pairs, zeroed))
        unipelt.on_optimizer_step(ours, step, TOTAL)
        theirs.base_model.update_and_allocate(step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        for (form, layer) in pairs:
            if step < TOTAL - TFINAL:
                # our allocator keeps its scores in float32 (PEFT in the parameters' float64)
                assert_close_scaled(allocator.triplet_scores(form).double(), _peft_triplet_scores(theirs, layer),
                                    ops=6, dtype=torch.float32,
                                    reason="|p·∇p|, two running averages, their product, the means and the sum "
                                           "rounded to float32 on our side")
            their_zero = layer.lora_E["default"].detach().flatten() == 0
            assert torch.equal(form.singular.detach() == 0, their_zero), f"step {step}: different λ zeroed"
        if TINIT < step < TOTAL - TFINAL:
            zeroed = [form.singular.detach() == 0 for form, _ in pairs]
    assert came_back, "no λ zeroed at a masking step moved at the next step: pruning is a hard mask"
    assert_close_scaled(ours(**batch).logits, theirs(**batch).logits, ops=TRAJECTORY_OPS * (TOTAL + 1),
                        reason=TRAJECTORY)
    pattern = theirs.peft_config["default"].rank_pattern
    their_ranks = sorted(sum(kept) for kept in pattern.values())
    assert sorted(form.effective_rank for form, _ in pairs) == their_ranks
    assert sum(their_ranks) == TARGET_R * len(pairs)


def test_regulariser_is_the_mean_of_unsquared_norms():
    """γ · mean over matrices of ‖PᵀP − I‖_F (not the sum of squares): on a 12-layer d=768 BERT at init it is about
    0.2, where the sum of squared norms was about 71."""
    ours = _ours()
    forms = [slot.form for slot in state_of(ours).slots.values()]
    norms = []
    for form in forms:
        P, Q = form.left.detach(), form.right.detach()
        norms.append(torch.sqrt(((P.T @ P - torch.eye(INIT_R, dtype=P.dtype)) ** 2).sum()))
        norms.append(torch.sqrt(((Q @ Q.T - torch.eye(INIT_R, dtype=Q.dtype)) ** 2).sum()))
    expected = GAMMA * sum(norms) / len(norms)
    assert_close_scaled(unipelt.regularization_loss(ours).detach(), expected, ops=3,
                        reason="the Gram products, sums of squares and roots written differently")
