"""Many adapters on one model: list, activate (a name, a list, or a composition block), delete, rename, and run a
batch whose rows go to different adapters. unipelt.attach(model, method, name=...) adds one.

The state lives in unipelt.adapter_set; composition blocks in unipelt.composition. Every function validates all
of its input before it changes anything.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import compat
from .adapter_set import (DEFAULT, apply, check_enabled, check_merged, check_name, check_not_fused, commit,
                          owners_in_force, plan_routes)
from .attach import adapter_set, detach, refuse_wrapped
from .composition import Stack, block_from_config, simplest
from .errors import AttachError


@compat.accepts_compiled
def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were attached."""
    refuse_wrapped(model, "list_adapters")
    return list(adapter_set(model).adapters)


@compat.accepts_compiled
def active_adapters(model: nn.Module) -> Any:
    """The active composition: a name, a list of names, or a block (None while none is active)."""
    aset = adapter_set(model)
    return None if aset.active is None else simplest(aset.active)


@compat.accepts_compiled
def set_active(model: nn.Module, spec: Any, trainable: Any = None) -> None:
    """Activate a name, a list of names (all applied, in order), or a composition block (Stack, Parallel, Average,
    BatchSplit; or their YAML form, e.g. {"stack": ["a", {"parallel": ["b", "c"]}]}). The active adapters train
    (`trainable`: a name or a list of active names, to train fewer); every other adapter is frozen and off."""
    refuse_wrapped(model, "set_active")
    apply(model, adapter_set(model), block_from_config(spec, "set_active"), trainable, caller="set_active")


@compat.accepts_compiled
def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove one adapter (its modules, hooks, copies of shared head / base values). The last one's deletion
    detaches unipelt altogether (unipelt.detach)."""
    aset = adapter_set(model)
    if name not in aset.adapters:
        raise AttachError(f"delete_adapter: no adapter named {name!r} (this model has: {', '.join(aset.adapters)})")
    check_not_fused(aset, name, "delete_adapter")
    detach(model, name)


@compat.accepts_compiled
def rename_adapter(model: nn.Module, old: str, new: str) -> None:
    """Give an adapter another name (its child modules are renamed with it; saved files do not change)."""
    aset = adapter_set(model)
    if old not in aset.adapters:
        raise AttachError(f"rename_adapter: no adapter named {old!r} (this model has: {', '.join(aset.adapters)})")
    check_name(new, "rename_adapter")
    check_not_fused(aset, old, "rename_adapter")  # the fusing adapter's method names it
    if new in aset.adapters:
        raise AttachError(f"rename_adapter: an adapter named '{new}' already exists")
    state = aset.adapters[old]
    modules = dict(model.named_modules())
    moves = []
    for canonical, slot in state.slots.items():
        host, _, child = canonical.rpartition(".")
        moves.append((modules[host] if host else model, child, slot))
    moves += [(model, canonical, module) for canonical, module in state.reparams.items()]
    for parent, child, module in moves:
        delattr(parent, state.child(child))
    state.name = new
    for parent, child, module in moves:
        parent.add_module(state.child(child), module)
    aset.adapters = {(new if n == old else n): s for n, s in aset.adapters.items()}
    aset.hook_order = [new if n == old else n for n in aset.hook_order]
    if old in aset.stored:
        aset.stored[new] = aset.stored.pop(old)
    aset.in_force = {p: (new if o == old else o) for p, o in aset.in_force.items()}
    aset.trainable = {new if n == old else n for n in aset.trainable}
    if aset.active is not None:
        aset.active = _renamed(aset.active, old, new)


def _renamed(block: Any, old: str, new: str) -> Any:
    if isinstance(block, str):
        return new if block == old else block
    members = tuple(_renamed(m, old, new) for m in block.members)
    clone = object.__new__(type(block))
    object.__setattr__(clone, "__dict__", {**block.__dict__, "members": members})
    return clone


@contextlib.contextmanager
@compat.accepts_compiled
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch runs with adapter adapter_names[i] alone (None: the base model),
    in forward and in generate (rows repeated for beams follow their row). The composition active before comes
    back at the end."""
    refuse_wrapped(model, "mixed_batch")
    aset = adapter_set(model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise AttachError("mixed_batch: adapter_names must be a non-empty list with one adapter name (or None) "
                          "per row")
    for index, name in enumerate(adapter_names):
        if name is not None and name not in aset.adapters:
            raise AttachError(f"mixed_batch: row {index} names adapter {name!r}, which this model does not have "
                              f"(it has: {', '.join(aset.adapters)})")
    check_merged(aset, "mixed_batch")
    check_enabled(aset, "mixed_batch")
    names = list(dict.fromkeys(n for n in adapter_names if n is not None))
    rows_of = {n: torch.tensor([i for i, m in enumerate(adapter_names) if m == n], dtype=torch.long) for n in names}
    block = Stack(*names) if names else None
    routes = plan_routes(aset, block, rows_of, len(adapter_names), "mixed_batch") if block is not None else {}
    keys = list(dict.fromkeys(adapter_names))
    groups = [(torch.tensor([i for i, m in enumerate(adapter_names) if m == key], dtype=torch.long),
               [] if key is None else [key]) for key in keys]
    owner = owners_in_force(aset, names, "mixed_batch", routed=len(keys) > 1)
    previous, trainable = aset.active, set(aset.trainable)
    commit(model, aset, block, names, routes, owner, trainable & set(names), groups if len(keys) > 1 else None,
           len(adapter_names), "mixed_batch", reorder=False)
    try:
        yield model
    finally:
        for state in aset.adapters.values():
            for slot in state.slots.values():
                slot.route = None
        if previous is None:
            for state in aset.adapters.values():
                for slot in state.slots.values():
                    slot.active = False
            aset.active = None
        else:
            apply(model, aset, previous, trainable or [], caller="mixed_batch")


__all__ = ["DEFAULT", "active_adapters", "delete_adapter", "list_adapters", "mixed_batch", "rename_adapter",
           "set_active"]
