"""merge / unmerge: fold modules that are linear in their input into the projection weights they modify.

Mergeable: a parallel bottleneck with no activation and no LayerNorm at a projection site, composed by add or
scale (LoRA and its kin). Everything else keeps running as a module, and merge() names it.

Exactness: merge() keeps a host-memory copy of the rows it changes (`MergeRecord`, one per slot) and unmerge()
puts them back, so unmerge / detach give the original weights bit for bit (subtracting ΔW again would leave
rounding behind). When the weight was changed after merging (trained with train_base, edited by hand), the copy
is stale: unmerge then subtracts the ΔW that merge() added, recorded at merge time, and says so.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import compat
from .attach import state_of
from .compose import Slot, chunk_rows
from .errors import AttachError
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


@dataclass
class MergeRecord:
    """What merge() changed on one host for one slot: the original rows (host memory), a digest of the merged
    rows (to tell whether they were changed since), and the ΔW / Δb that were added (the fallback for unmerge)."""

    weight: torch.Tensor | None  # original rows; None for a 4-bit weight (its packed data is kept by add_to_4bit)
    bias: torch.Tensor | None
    digest: str
    delta_w: torch.Tensor
    delta_b: torch.Tensor | None


def _rows_view(host: nn.Module, slot: Slot) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weight rows (Conv1D: columns) and bias rows the slot modifies, as views; weight None when 4-bit."""
    transposed = compat.is_transposed_linear(host)  # Conv1D stores [in, out]
    if is_4bit(host):
        rows = chunk_rows(slot.chunk, host.out_features)
        return None, (host.bias[rows] if host.bias is not None else None)
    weight = host.weight
    rows = chunk_rows(slot.chunk, weight.shape[1] if transposed else weight.shape[0])
    bias = host.bias[rows] if getattr(host, "bias", None) is not None else None
    return (weight[:, rows] if transposed else weight[rows]), bias


def _digest(host: nn.Module, slot: Slot) -> str:
    weight, bias = _rows_view(host, slot)
    if weight is None:
        weight = host.weight.data  # the packed 4-bit bytes
    h = hashlib.blake2b(digest_size=16)
    for tensor in (weight, bias):
        if tensor is not None:
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _add(host: nn.Module, slot: Slot, delta_w: torch.Tensor, delta_b: torch.Tensor | None, sign: float) -> None:
    transposed = compat.is_transposed_linear(host)
    weight = host.weight
    rows = chunk_rows(slot.chunk, weight.shape[1] if transposed else weight.shape[0])
    if transposed:
        weight[:, rows] += sign * delta_w.T.to(weight.device)
    else:
        weight[rows] += sign * delta_w.to(weight.device)
    if delta_b is not None:
        host.bias[rows] += sign * delta_b.to(host.bias.device)


@torch.no_grad()
def _merge_one(host: nn.Module, slot: Slot) -> float | None:
    """W += ΔW on the rows (outputs) that the slot modifies; handles nn.Linear, GPT-2's Conv1D and 4-bit NF4
    weights (dequantize, add, requantize: returns the max abs rounding error). Records how to undo it exactly."""
    weight_rows, bias_rows = _rows_view(host, slot)
    bias_copy = None if bias_rows is None else bias_rows.detach().to("cpu", copy=True)
    error = None
    if is_4bit(host):
        delta_w, delta_b = _delta(slot, host.bias.dtype if host.bias is not None else torch.get_default_dtype())
        if delta_b is not None:
            host.bias[chunk_rows(slot.chunk, host.out_features)] += delta_b
        error, slot.quantized_merge_undo = add_to_4bit(host, chunk_rows(slot.chunk, host.out_features), delta_w)
        weight_copy = None
    else:
        delta_w, delta_b = _delta(slot, host.weight.dtype)
        weight_copy = weight_rows.detach().to("cpu", copy=True)
        _add(host, slot, delta_w, delta_b, +1.0)
    slot.merge_record = MergeRecord(weight=weight_copy, bias=bias_copy, digest=_digest(host, slot),
                                    delta_w=delta_w.detach().to("cpu", copy=True),
                                    delta_b=None if delta_b is None else delta_b.detach().to("cpu", copy=True))
    return error


@torch.no_grad()
def _unmerge_one(host: nn.Module, slot: Slot, name: str) -> None:
    """Put back the rows merge() saved (bit-exact); if they were changed since, subtract the recorded ΔW."""
    record: MergeRecord | None = getattr(slot, "merge_record", None)
    if record is None:  # cannot happen through merge(); kept as a loud error rather than a silent skip
        raise AttachError(f"unmerge: module '{name}' is marked merged but has no merge record")
    weight_rows, bias_rows = _rows_view(host, slot)
    if _digest(host, slot) == record.digest:
        if is_4bit(host):
            restore_4bit(host, slot.quantized_merge_undo)
            slot.quantized_merge_undo = None
        else:
            weight_rows.copy_(record.weight.to(weight_rows.device))
        if record.bias is not None:
            bias_rows.copy_(record.bias.to(bias_rows.device))
    else:
        warnings.warn(f"unmerge: the weights of '{name.rpartition('.')[0]}' changed after merge(); subtracting the "
                      "merged ΔW (not bit-exact)", stacklevel=3)
        if is_4bit(host):
            raise AttachError(f"unmerge: the 4-bit weight of '{name.rpartition('.')[0]}' changed after merge(); it "
                              "cannot be restored")
        _add(host, slot, record.delta_w, record.delta_b, -1.0)
    slot.merge_record = None


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
    if any(not slot.active for slot in state.slots.values()):
        raise AttachError("merge: called inside unipelt.disabled(model); merge after the block")
    todo = []
    for name, slot in state.slots.items():
        if name in state.merged:
            continue
        host = modules[name.rpartition(".")[0]]
        reason = _cannot_merge_reason(host, slot)
        if reason is not None:
            skipped.append(f"{name} ({reason})")
            continue
        todo.append((name, slot, host))
    for name, slot, host in todo:  # every check before any weight changes: nothing is half-merged
        bad = _non_finite(slot)
        if bad is not None:
            raise AttachError(f"merge: module '{name}' has {bad} values in its ΔW; nothing was merged")
    for name, slot, host in todo:
        error = _merge_one(host, slot)
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


def _non_finite(slot: Slot) -> str | None:
    delta_w, delta_b = _delta(slot, torch.float32)
    for tensor in (delta_w, delta_b):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            return "nan" if bool(torch.isnan(tensor).any()) else "inf"
    return None


def unmerge(model: nn.Module) -> list[str]:
    """Undo merge(): the original weights bit for bit (the saved rows are put back, last merged first)."""
    state = state_of(model)
    modules = dict(model.named_modules())
    undone = []
    for name in reversed(state.merged):
        slot = state.slots[name]
        _unmerge_one(modules[name.rpartition(".")[0]], slot, name)
        slot.merged = False
        undone.append(name)
    state.merged.clear()
    return undone
