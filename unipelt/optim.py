"""What a training loop asks of an attached method: parameter groups, extra loss terms, per-step updates, metrics.

This is the whole contract between a method and any trainer (unipelt's own, or a user's loop). A form or a
slot takes part by defining any of these optional methods; nothing here knows about particular forms:

- `regularization_loss() -> Tensor | None`   added to the task loss (e.g. AdaLoRA's orthogonality term)
- `on_optimizer_step(step, total_steps)`      called after each optimizer step, before the gradients are
                                              cleared (e.g. AdaLoRA's importance scores and rank budget)
- `training_metrics() -> dict[str, float]`    values worth logging (e.g. UniPELT's gate values)
- `training_state() -> dict` and `load_training_state(state)`
                                              state that changes during training but is not a parameter (e.g.
                                              AdaLoRA's importance averages and rank masks): a resumable
                                              checkpoint carries it
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from . import compat
from .attach import adapter_set, state_of
from .errors import AttachError
from .spec import MethodSpec


def _participants(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, Any]]:
    """Every slot and reparameterisation of an adapter (the only or the active one without a name), every submodule
    inside them, and its controllers (objects that see several slots at once, e.g. AdaLoRA's rank allocator with
    its global budget)."""
    state = state_of(model, name, "unipelt.optim")
    roots = list(state.slots.items()) + list(state.reparams.items())
    for root_name, root in roots:
        for name, module in root.named_modules():
            yield (f"{root_name}.{name}" if name else root_name), module
    yield from state.controllers.items()


def _no_decay(param: torch.Tensor) -> bool:
    # Biases, LayerNorm weights and scalars (learned scales, gates' biases) are not decayed, as is customary.
    return param.dim() < 2


@compat.accepts_compiled
def method_of(model: nn.Module, name: str | None = None) -> MethodSpec:
    """The attached method's spec (what a trainer reads method-level choices from, e.g. `optimizer`)."""
    return state_of(model, name, "method_of").method


@compat.accepts_compiled
def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 name: str | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups of an adapter (the only or the active one without a name): each module spec's own
    `lr` where it sets one, else `lr`; decay only on matrices. Only that adapter's parameters (and the base / head
    parameters it trains) are listed, so an optimizer built from them never steps another adapter."""
    state = state_of(model, name, "param_groups")
    # merged or disabled modules take no part in forward: their parameters would get no gradients, in silence
    if state.merged:
        raise AttachError("param_groups: modules are merged into the weights and would not train; "
                          "call unipelt.unmerge(model) first")
    if any(not getattr(slot, "active", True) for slot in state.slots.values()):
        raise AttachError("param_groups: called inside unipelt.disabled(model); train outside the block")
    lr_of: dict[int, float] = {}
    for slot in state.slots.values():
        for param in slot.parameters():
            lr_of[id(param)] = slot.spec.lr or lr
    specs = {m.name: m for m in state.method.modules}
    for reparam_name, reparam in state.reparams.items():
        for param in reparam.parameters():
            lr_of[id(param)] = specs[state.reparam_owners[reparam_name]].lr or lr
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    own = _own_parameter_ids(model, state)
    for pname, param in model.named_parameters():
        if not param.requires_grad or id(param) not in own:
            continue
        group_lr = lr_of.get(id(param), lr)
        decay = 0.0 if _no_decay(param) else weight_decay
        group = groups.setdefault((group_lr, decay), {"params": [], "names": [], "lr": group_lr,
                                                      "weight_decay": decay})
        group["params"].append(param)
        group["names"].append(pname)
    return list(groups.values())


def _own_parameter_ids(model: nn.Module, state: Any) -> set[int]:
    """The parameters one adapter trains: its modules', the base / head parameters it lists, and any other
    trainable parameter that belongs to no adapter (a user's own unfrozen module; as before several adapters)."""
    aset = adapter_set(model)
    mine = {id(p) for m in [*state.slots.values(), *state.reparams.values()] for p in m.parameters()}
    others = {id(p) for n, s in aset.adapters.items() if n != state.name
              for m in [*s.slots.values(), *s.reparams.values()] for p in m.parameters()}
    params = dict(model.named_parameters())
    shared = {pname for n in aset.adapters for pname in aset.owned(n)}
    mine |= {id(params[pname]) for pname in aset.owned(state.name)}
    loose = {id(p) for pname, p in params.items() if pname not in shared and id(p) not in others}
    return mine | loose


@compat.accepts_compiled
def regularization_loss(model: nn.Module, name: str | None = None) -> torch.Tensor | None:
    """The sum of every module's extra loss term, or None when the method has none."""
    total = None
    for _, module in _participants(model, name):
        fn = getattr(module, "regularization_loss", None)
        if fn is None:
            continue
        term = fn()
        if term is not None:
            total = term if total is None else total + term
    return total


@compat.accepts_compiled
def on_optimizer_step(model: nn.Module, step: int, total_steps: int, name: str | None = None) -> None:
    """Tell every module that optimizer step `step` (1-based) of `total_steps` has been taken."""
    for _, module in _participants(model, name):
        fn = getattr(module, "on_optimizer_step", None)
        if fn is not None:
            fn(step, total_steps)


@compat.accepts_compiled
def training_metrics(model: nn.Module, name: str | None = None) -> dict[str, float]:
    """Values worth logging during training, keyed by the slot that reports them, plus `mean/<module>/<key>`: the
    mean over a module spec's slots (e.g. `mean/prefix/gate`, the average UniPELT prefix gate)."""
    out: dict[str, float] = {}
    per_module: dict[str, list[float]] = {}
    for key_name, module in _participants(model, name):
        fn = getattr(module, "training_metrics", None)
        if fn is None:
            continue
        spec = getattr(module, "spec", None) if isinstance(module, nn.Module) else None
        for key, value in fn().items():
            out[f"{key_name}/{key}"] = float(value)
            if spec is not None:
                per_module.setdefault(f"mean/{spec.name}/{key}", []).append(float(value))
    out.update({key: sum(values) / len(values) for key, values in per_module.items()})
    return out


__all__ = ["method_of", "param_groups", "regularization_loss", "on_optimizer_step", "training_metrics"]


@compat.accepts_compiled
def training_state(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """Every participant's non-parameter training state, keyed by its name; {} when the method has none."""
    out: dict[str, Any] = {}
    for key, module in _participants(model, name):
        fn = getattr(module, "training_state", None)
        if fn is not None:
            out[key] = fn()
    return out


@compat.accepts_compiled
def load_training_state(model: nn.Module, state: dict[str, Any], source: str, name: str | None = None) -> None:
    """Restore what training_state returned; `source` (a checkpoint path) names the culprit of a mismatch."""
    owners = {key: module for key, module in _participants(model, name) if hasattr(module, "load_training_state")}
    if set(owners) != set(state):
        culprit = sorted(set(owners) ^ set(state))[0]
        what = "holds no" if culprit in owners else "holds a"
        raise AttachError(f"{source} {what} training state for '{culprit}', which the attached method "
                          f"{'needs' if culprit in owners else 'lacks'}; was it written with another method or by "
                          "an older unipelt? Resuming would restart that state in silence")
    for key, module in owners.items():
        module.load_training_state(state[key])
