"""AdaLoRA against PEFT's AdaLoRA (an independent implementation of the reference code) on the same weights:
the orthogonal regulariser, the importance scores after every step, which λ are zeroed at each masking step
(pruned triplets can come back), and the outputs after the same gradient steps. float64 on both sides, so that
near-equal scores cannot order differently through rounding alone."""

from __future__ import annotations

import pytest
import torch

import unipelt
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

peft = pytest.importorskip("peft")

TOTAL, TINIT, TFINAL, DELTA_T, INIT_R, TARGET_R, ALPHA, GAMMA = 12, 2, 4, 2, 6, 2, 8.0, 0.1
SITES = {"attn.q": "query", "attn.v": "value", "ffn.up": "intermediate.dense"}


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
        torch.testing.assert_close(out.logits, their_out.logits, rtol=0, atol=1e-9)
        torch.testing.assert_close(regulariser, their_regulariser, rtol=1e-9, atol=1e-12)
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
                torch.testing.assert_close(allocator.triplet_scores(form).double(),
                                           _peft_triplet_scores(theirs, layer), rtol=1e-6, atol=1e-15)
            their_zero = layer.lora_E["default"].detach().flatten() == 0
            assert torch.equal(form.singular.detach() == 0, their_zero), f"step {step}: different λ zeroed"
        if TINIT < step < TOTAL - TFINAL:
            zeroed = [form.singular.detach() == 0 for form, _ in pairs]
    assert came_back, "no λ zeroed at a masking step moved at the next step: pruning is a hard mask"
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=1e-9)
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
    torch.testing.assert_close(unipelt.regularization_loss(ours).detach(), expected, rtol=1e-12, atol=0)
