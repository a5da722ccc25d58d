"""merge / unmerge: fold the slots whose Δh is linear into the weights they modify, and undo it.

Each slot decides for itself what folds and how (unipelt/slot.py, unipelt/weight_fold.py): a parallel linear map
at a projection (LoRA, AdaLoRA: W += s·ΔW) or a sequential per-feature scaling ((IA)³: W's rows, or the down
projection's columns, scale). Everything else keeps running as a module, and merge() names it. Every check runs
before any weight changes, so nothing is half-merged; unmerge() gives the original weights bit for bit.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import compat
from .attach import adapter_set, is_attached, state_of, unmerge_slots
from .errors import AttachError
from .slot import Slot


@compat.accepts_compiled
def merge(model: nn.Module, name: str | None = None) -> dict[str, list[str]]:
    """Fold every mergeable slot of an adapter (`name`; default: the only or the active one) into its weight.
    Returns {'merged': [...], 'unmerged': [...]} (slot names)."""
    state = state_of(model, name, "merge")
    modules = dict(model.named_modules())
    merged, skipped = [], []
    rounding: dict[str, float] = {}
    if any(not slot.active for slot in state.slots.values()):
        if state.name in adapter_set(model).active_names():
            raise AttachError("merge: called inside unipelt.disabled(model); merge after the block")
        raise AttachError(f"merge: adapter '{state.name}' is not active; merging it would change outputs "
                          f"(call unipelt.set_active(model, '{state.name}') first)")
    if any(slot.route is not None for slot in state.slots.values()):
        raise AttachError(f"merge: adapter '{state.name}' acts on some rows or beside others in a block; "
                          "a merged weight serves every row alone (activate it alone first)")
    todo = []
    for name, slot in state.slots.items():
        if name in state.merged:
            continue
        host = modules[name.rpartition(".")[0]]
        reason = slot.cannot_merge(host)
        if reason is not None:
            skipped.append(f"{name} ({reason})")
            continue
        todo.append((name, slot, host))
    for name, slot, host in todo:  # every check before any weight changes: nothing is half-merged
        bad = slot.non_finite()
        if bad is not None:
            raise AttachError(f"merge: module '{name}' has {bad} values in its ΔW; nothing was merged")
    by_host: dict[int, list[tuple[str, Slot, nn.Module]]] = {}
    for entry in todo:
        by_host.setdefault(id(entry[2]), []).append(entry)
    for group in by_host.values():
        # The ΔW of every slot on one projection is taken before any of them folds: a form that reads its host's
        # weight (DoRA's norm) must see the weight unmerged, not with its neighbour already folded in.
        maps = [slot.linear_map() for _, slot, _ in group]  # fresh tensors: no map is a view of the host's weight
        for (name, slot, host), linear in zip(group, maps):
            error = slot.merge(host, linear)
            if error is not None:
                rounding[name] = error
            state.merged.append(name)
            merged.append(name)
    if skipped:
        kinds = sorted({s.split(" (")[0].rsplit(".", 1)[-1] for s in skipped})
        warnings.warn(f"merge: {len(skipped)} modules stay unmerged and keep running as modules: {', '.join(kinds)}",
                      stacklevel=2)
    if rounding:
        warnings.warn(f"merge: {len(rounding)} modules were merged into 4-bit NF4 weights; requantizing rounds the "
                      f"merged weights (max abs rounding error {max(rounding.values()):.3g}); unmerge() restores "
                      "the original 4-bit weights exactly", stacklevel=2)
        return {"merged": merged, "unmerged": skipped, "rounding_error": rounding}
    return {"merged": merged, "unmerged": skipped}


@compat.accepts_compiled
def unmerge(model: nn.Module, name: str | None = None) -> list[str]:
    """Undo merge(): the original weights bit for bit (each merged slot puts back what it changed, last first).
    Without a name, every merged adapter is unmerged."""
    if name is None and is_attached(model):
        undone = []
        for adapter, state in reversed(list(adapter_set(model).adapters.items())):
            if state.merged:
                undone.extend(unmerge_slots(model, adapter))
        return undone
    return unmerge_slots(model, name)


__all__ = ["merge", "unmerge"]
