"""merge / unmerge: fold modules that are linear in their input into the projection weights they modify.

Mergeable: a parallel bottleneck with no activation and no LayerNorm at a projection site, composed by add or
scale (LoRA and its kin). Everything else keeps running as a module, and merge() names it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import compat
from .attach import state_of
from .compose import Slot, chunk_rows
from .quantize import add_to_4bit, is_4bit, restore_4bit
from .spec import PROJECTION_SITES


def _mergeable(slot: nn.Module) -> bool:
    return (
        isinstance(slot, Slot)
        and slot.spec.is_linear
        and slot.spec.insertion == "parallel"
        and slot.site in PROJECTION_SITES
    )


def _delta(slot: Slot, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s·ΔW, s·Δb) in `dtype`, s the slot's fixed or learned scale."""
    delta_w, delta_b = slot.form.linear_delta()
    factor = slot.composer.factor(None)
    factor = factor.detach() if isinstance(factor, torch.Tensor) else factor
    delta_w = (delta_w * factor).to(dtype)
    delta_b = None if delta_b is None else (delta_b * factor).to(dtype)
    return delta_w, delta_b


@torch.no_grad()
def _apply(host: nn.Module, slot: Slot, sign: float) -> float | None:
    """W += sign·ΔW on the rows (outputs) that the slot modifies; handles nn.Linear, GPT-2's Conv1D and 4-bit
    NF4 weights (dequantize, add, requantize: returns the max abs rounding error; unmerge restores exactly)."""
    weight = host.weight
    if is_4bit(host):
        return _apply_4bit(host, slot, sign)
    delta_w, delta_b = _delta(slot, weight.dtype)
    transposed = compat.is_transposed_linear(host)  # Conv1D stores [in, out]
    rows = chunk_rows(slot.chunk, weight.shape[1] if transposed else weight.shape[0])
    if transposed:
        weight[:, rows] += sign * delta_w.T
    else:
        weight[rows] += sign * delta_w
    if delta_b is not None:
        host.bias[rows] += sign * delta_b
    return None


def _apply_4bit(host: nn.Module, slot: Slot, sign: float) -> float | None:
    rows = chunk_rows(slot.chunk, host.out_features)
    delta_w, delta_b = _delta(slot, host.bias.dtype if host.bias is not None else torch.get_default_dtype())
    if delta_b is not None:
        host.bias[rows] += sign * delta_b
    if sign < 0:
        restore_4bit(host, slot.quantized_merge_undo)
        slot.quantized_merge_undo = None
        return None
    error, slot.quantized_merge_undo = add_to_4bit(host, rows, delta_w)
    return error


def _cannot_merge_reason(host: nn.Module, slot: nn.Module) -> str | None:
    if not _mergeable(slot):
        return "not linear in the input (activation, LayerNorm, sequential, gate or prefix)"
    if slot.form.linear_delta()[1] is not None and getattr(host, "bias", None) is None:
        return "has a bias but the projection has none"
    if is_4bit(host):
        return None
    if not isinstance(getattr(host, "weight", None), torch.Tensor) or not host.weight.dtype.is_floating_point:
        return "the projection weight is not a floating-point tensor (quantized?)"
    return None


def merge(model: nn.Module) -> dict[str, list[str]]:
    """Fold every mergeable slot into its weight. Returns {'merged': [...], 'unmerged': [...]} (slot names)."""
    state = state_of(model)
    modules = dict(model.named_modules())
    merged, skipped = [], []
    rounding: dict[str, float] = {}
    for name, slot in state.slots.items():
        if name in state.merged:
            continue
        host = modules[name.rpartition(".")[0]]
        reason = _cannot_merge_reason(host, slot)
        if reason is not None:
            skipped.append(f"{name} ({reason})")
            continue
        error = _apply(host, slot, +1.0)
        if error is not None:
            rounding[name] = error
        slot.merged = True
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


def unmerge(model: nn.Module) -> list[str]:
    """Subtract what merge() added (equal to the original weights up to floating-point rounding)."""
    state = state_of(model)
    modules = dict(model.named_modules())
    undone = []
    for name in reversed(state.merged):
        slot = state.slots[name]
        _apply(modules[name.rpartition(".")[0]], slot, -1.0)
        slot.merged = False
        undone.append(name)
    state.merged.clear()
    return undone
