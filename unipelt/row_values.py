"""Rows that need other values of a shared trained parameter than the model holds.

Several adapters may each train their own copy of one base or head parameter (every task adapter its classifier,
Houlsby its LayerNorms, BitFit its biases; unipelt.adapter_set keeps the copies). When the rows of one batch go to
different adapters (a mixed batch, a BatchSplit), the model holds one adapter's copy; every module with such a
parameter gets a forward hook, run before any adapter's own hook on it, that recomputes the other rows' output
from the module's input with their adapter's copy (torch.func.functional_call) or the original values (rows of
the base, or of an adapter that does not train it).

Only the copy in the model learns: backward through rows served by a stored copy of an adapter that trains would
leave that copy untouched, so such a forward with gradients enabled is refused.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import compat
from .errors import AttachError


def _expanded(rows: torch.Tensor, batch: int, size: int, what: str) -> torch.Tensor:
    if size == batch:
        return rows
    if size % batch:
        raise AttachError(f"{what}: set for a batch of {batch} rows, got {size} rows")
    k = size // batch
    return (rows[:, None] * k + torch.arange(k)).reshape(-1)


def _bare(module: nn.Module) -> nn.Module:
    """The module without its hooks (a shallow copy sharing its submodules and tensors): recomputing some rows must
    not run the adapters' hooks on them a second time, nor this hook again."""
    bare = copy.copy(module)
    bare._forward_hooks, bare._forward_pre_hooks = OrderedDict(), OrderedDict()
    bare._forward_hooks_with_kwargs, bare._forward_hooks_always_called = OrderedDict(), OrderedDict()
    bare._forward_pre_hooks_with_kwargs = OrderedDict()
    bare._parameters, bare._buffers = OrderedDict(module._parameters), OrderedDict(module._buffers)
    return bare


def _hook(variants: list[tuple[torch.Tensor, dict[str, torch.Tensor], str | None]], batch: int,
          trainable: set[str], what: str, bare: nn.Module):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = compat.module_input(args, kwargs)
        out = output[0] if isinstance(output, tuple) else output
        for rows, values, adapter in variants:
            if adapter in trainable and torch.is_grad_enabled():
                raise AttachError(f"{what}: adapter '{adapter}' trains its own copy of a task head or base parameter "
                                  "and is not the adapter in force; it cannot train in a batch shared with other "
                                  "adapters (train it alone, or under torch.no_grad() for inference)")
            rows = _expanded(rows, batch, out.shape[0], what).to(out.device)
            if rows.numel() == 0:
                continue
            sub = functional_call(bare, values, (x.index_select(0, rows),))
            sub = sub[0] if isinstance(sub, tuple) else sub
            out = out.index_copy(0, rows, sub.to(out.dtype))
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
    return hook


def owner_among(aset: Any, adapters: list[str], pname: str, what: str) -> str | None:
    """The one adapter of `adapters` (the adapters acting on some rows) that trains `pname`, or None."""
    owners = [a for a in adapters if pname in aset.owned(a)]
    if len(owners) > 1:
        raise AttachError(f"{what}: adapters '{owners[0]}' and '{owners[1]}' act on the same rows and each train "
                          f"'{pname}'; only one of them can serve those rows")
    return owners[0] if owners else None


def install_row_values(model: nn.Module, aset: Any, row_groups: list[tuple[torch.Tensor, list[str]]], batch: int,
                       what: str) -> list[Any]:
    """Hooks for every module holding a shared trained parameter whose rows need other values than the model's.
    row_groups: (rows, the adapters acting on them) for every group of rows; returns the hooks' handles."""
    by_module: dict[str, list[str]] = {}
    for pname in aset.in_force:
        by_module.setdefault(pname.rpartition(".")[0], []).append(pname)
    handles = []
    for path, pnames in by_module.items():
        variants = []
        for rows, adapters in row_groups:
            values, users = {}, None
            for pname in pnames:
                owner = owner_among(aset, adapters, pname, what)
                if aset.in_force[pname] == owner:
                    continue
                values[pname.rpartition(".")[2]] = aset.base_values[pname] if owner is None else \
                    aset.stored[owner][pname]
                users = owner if owner is not None else users
            if values:
                variants.append((rows, values, users))
        if variants:
            module = model.get_submodule(path)
            hook = _hook(variants, batch, set(aset.trainable), what, _bare(module))
            handles.append(module.register_forward_hook(hook, with_kwargs=True, prepend=True))
    return handles


__all__ = ["install_row_values", "owner_among"]
