"""AdaLoRA says so when a training loop does not drive its training contract (unipelt/forms/svd/watch.py), instead
of training in silence as a fixed-rank SVD adapter: a warning, once, when the rank allocator or the regulariser is
left out, or when it masks before it has scored anything; an error where the call itself is misplaced (scoring
without gradients, which would prune every triplet).
A loop that drives the whole contract, with gradient accumulation and checkpointing, hears nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

import unipelt
from tiny_models import tiny_batch, tiny_model

METHOD = {"name": "ada", "modules": [{"form": "svd", "at": ["attn.q", "attn.v"], "insertion": "parallel",
                                      "compose": "scale", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2,
                                      "delta_t": 2}]}
STEPS = 8


def _loop(model, *, drive=True, regularise=True, accumulate=1, steps=STEPS):
    batch = tiny_batch("bert")
    optimizer = torch.optim.AdamW(unipelt.param_groups(model, lr=1e-2))
    model.train()
    for step in range(1, steps + 1):
        for _ in range(accumulate):
            loss = model(**batch).loss
            if regularise:
                loss = loss + unipelt.regularization_loss(model)
            (loss / accumulate).backward()
        optimizer.step()
        if drive:
            unipelt.on_optimizer_step(model, step, steps)
        optimizer.zero_grad()
    model.eval()


def _warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "AdaLoRA" in str(w.message)]


def test_a_loop_that_drives_the_contract_hears_nothing():
    assert _warnings(lambda: _loop(unipelt.attach(tiny_model("bert"), METHOD))) == []
    assert _warnings(lambda: _loop(unipelt.attach(tiny_model("bert"), METHOD), accumulate=2)) == []


def test_gradient_checkpointing_recomputes_without_a_warning():
    model = unipelt.attach(tiny_model("bert"), METHOD)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert _warnings(lambda: _loop(model, accumulate=2)) == []


def test_a_loop_without_on_optimizer_step_is_warned_once():
    found = _warnings(lambda: _loop(unipelt.attach(tiny_model("bert"), METHOD), drive=False))
    assert len(found) == 1
    assert found[0].startswith("AdaLoRA module 'm0': the gradients were cleared after a backward pass without "
                               "unipelt.optim.on_optimizer_step: the rank allocator is not being driven, so this "
                               "trains as a fixed-rank SVD adapter without AdaLoRA's rank budget; drive it")
    assert "unipelt.integrations.UnipeltTrainer or UnipeltCallback" in found[0]


def test_a_loop_without_the_regulariser_is_warned_once():
    found = _warnings(lambda: _loop(unipelt.attach(tiny_model("bert"), METHOD), regularise=False))
    assert found == [found[0]] and found[0].startswith(
        "AdaLoRA module 'm0': optimizer step 1 was taken without unipelt.optim.regularization_loss(model) in the "
        "loss: this trains without AdaLoRA's orthogonal regulariser")
    no_weight = {**METHOD, "modules": [{**METHOD["modules"][0], "orth_reg_weight": 0.0}]}
    assert _warnings(lambda: _loop(unipelt.attach(tiny_model("bert"), no_weight), regularise=False)) == []


def test_on_optimizer_step_without_gradients_is_an_error():
    model = unipelt.attach(tiny_model("bert"), METHOD)
    model.train()
    model(**tiny_batch("bert")).loss.backward()
    model.zero_grad()
    with pytest.raises(unipelt.UnipeltError, match=r"^AdaLoRA module 'm0': on_optimizer_step\(step 1\) found no "
                                                   r"gradients; call it after optimizer.step\(\) and before the "
                                                   r"gradients are cleared \(zero_grad\)"):
        unipelt.on_optimizer_step(model, 1, STEPS)


def test_masking_before_any_score_is_warned():
    """A schedule that reaches its final budget at the first step has nothing to rank the triplets by: all scores are
    zero and the threshold prunes every one of them (as before; PEFT's allocator raises there). It says so."""
    model = unipelt.attach(tiny_model("bert"), METHOD)
    found = _warnings(lambda: _loop(model, steps=3))
    assert found == ["AdaLoRA module 'm0': masking to a budget of 8 before any importance score was computed, so "
                     "every triplet is pruned (rank 0): the schedule leaves no step to score before it (tinit / tfinal "
                     "against the run's total steps), or a resume lost the checkpoint's training state; "
                     + found[0].split("; ", 1)[1]]
