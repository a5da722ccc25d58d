"""Gradient checkpointing re-runs each layer's forward during backward; adapters must give the same loss and the
same gradients as without it, whether the re-run is non-reentrant or reentrant. The sub-layer input that a
pre-hook captures for the output hook must be the one of the re-run, or gradients would flow to a stale graph."""

from __future__ import annotations

import pytest
import torch

import unipelt
from numerics import assert_close_scaled, assert_same
from unipelt.attach import state_of
from unipelt.slot import Slot
from tiny_models import perturb_adapters, tiny_batch, tiny_model

METHODS = ("lora", "mam", "houlsby", "pa")
FAMILIES = ("llama", "bert", "bart")
CASES = [(family, method) for family in FAMILIES for method in METHODS]


def _perturbed(family: str, method: str):
    """A tiny model with the method attached and every adapter parameter moved off its (often zero) init."""
    return perturb_adapters(unipelt.attach(tiny_model(family), method))


def _count_slot_calls(model) -> list[int]:
    """Count forward calls of every bottleneck slot (a re-run layer calls them again)."""
    calls = [0]

    def bump(*_):
        calls[0] += 1

    for slot in state_of(model).slots.values():
        if isinstance(slot, Slot):
            slot.register_forward_hook(bump)
    return calls


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # dropout masks: checkpointing replays the forward's RNG state
    loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_checkpointing_gives_same_loss_and_gradients(family, method, reentrant):
    model = _perturbed(family, method)
    batch = tiny_batch(family)
    model.train()
    calls = _count_slot_calls(model)
    reference_loss, reference = _loss_and_grads(model, batch)
    plain_calls, calls[0] = calls[0], 0
    adapter_names = {name for name, p in model.named_parameters() if "unipelt_" in name and p.requires_grad}
    assert adapter_names and adapter_names <= set(reference)

    options = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if reentrant:
        # Reentrant checkpointing only back-propagates into a layer whose inputs require grad; with a frozen
        # embedding they do not, so (as with PEFT) the input embeddings must be made to require grad.
        model.enable_input_require_grads()
    loss, grads = _loss_and_grads(model, batch)

    assert plain_calls > 0
    if reentrant:  # every layer, adapters included, really ran twice
        assert calls[0] == 2 * plain_calls
    else:  # torch stops a non-reentrant re-run early, once every tensor the backward needs is recomputed
        assert plain_calls <= calls[0] <= 2 * plain_calls
    # The forward is the same operations on the same values (the dropout masks replayed).
    assert_same(loss, reference_loss)
    assert set(grads) == set(reference)
    config = model.config
    layers = getattr(config, "encoder_layers", 0) + getattr(config, "decoder_layers", 0) or config.num_hidden_layers
    for name in reference:
        if not reentrant:  # the re-run rebuilds the same graph: the same backward in the same order
            assert_same(grads[name], reference[name], msg=name)
        else:  # one backward per layer: a tensor several layers read (BART's encoder output, a prefix MLP shared
            # by one attention kind's layers) sums its gradient contributions in another order, up to 2 a layer
            assert_close_scaled(grads[name], reference[name], ops=2 * layers, msg=name,
                                reason="the gradient contributions of tensors several layers read (the encoder "
                                       "output, a shared prefix MLP), summed in another order")
    # Nothing captured for an output hook may outlive the step (it would pin the layer's activations).
    assert all(getattr(slot, "captured_x", None) is None for slot in state_of(model).slots.values())
