"""Folding a slot's linear Δh into the weight it modifies, and undoing it (the mechanics of merge / unmerge).

A form with a linear Δh gives its map as a `LinearMap` (Δh = M·u + c, M a matrix or a per-feature diagonal); the
slot's composer gives the constant factor s. Three folds:
- parallel at a projection (LoRA, AdaLoRA): W += s·M, b += s·c on the rows the slot modifies;
- sequential per-feature scaling at a projection ((IA)³ at k, v): h' = (1 + s·m)⊙h, rows of W and b scale;
- sequential per-feature scaling at an activation ((IA)³ at ffn.act): the consuming projection's columns scale.
A 4-bit NF4 weight takes the parallel fold only (dequantize, add, requantize).

Exactness: fold() keeps a host-memory copy of the region it changes (`MergeRecord`) and unfold() puts it back, so
unmerge / detach give the original weights bit for bit. When the region was changed after merging (trained with
train_base, edited by hand), the copy is stale: unfold then applies the inverse of the fold recorded at merge time
(subtract, or divide) and says so.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import AttachError
from .quantize import add_to_4bit, is_4bit, restore_4bit
from .sites.linear import is_transposed


@dataclass
class LinearMap:
    """Δh = M·u + c for a linear form: `weight` is M as [out, in], or its diagonal [d] when `diagonal`."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    diagonal: bool = False

    def detached(self) -> "LinearMap":
        bias = None if self.bias is None else self.bias.detach().to("cpu", copy=True)
        return LinearMap(self.weight.detach().to("cpu", copy=True), bias, self.diagonal)

    def non_finite(self, factor: float) -> str | None:
        """'nan' or 'inf' when s·M or s·c holds one, else None."""
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                scaled = factor * tensor.detach().float()
                if not bool(torch.isfinite(scaled).all()):
                    return "nan" if bool(torch.isnan(scaled).any()) else "inf"
        return None


@dataclass
class MergeRecord:
    """What a fold changed: the original region (host memory; None for a 4-bit weight, whose packed data is kept
    as `undo_4bit`), a digest of the folded region (to tell whether it was changed since), and the fold itself."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    digest: str
    linear: LinearMap
    factor: float
    undo_4bit: Any = None


def chunk_rows(chunk: tuple[int, int] | None, out_features: int) -> slice:
    """The output rows a slot modifies: all, or its (index, count) chunk of a fused projection (GPT-2's c_attn)."""
    if chunk is None:
        return slice(None)
    index, count = chunk
    width = out_features // count
    return slice(index * width, (index + 1) * width)


def region(host: nn.Module, chunk: tuple[int, int] | None, columns: bool) -> tuple[torch.Tensor | None, Any]:
    """(weight view as [out, in] restricted to the slot's rows — all of it when `columns` —, bias view); the weight
    is None for a 4-bit host."""
    bias = getattr(host, "bias", None)
    if is_4bit(host):
        rows = chunk_rows(chunk, host.out_features)
        return None, (bias[rows] if bias is not None else None)
    weight = host.weight.T if is_transposed(host) else host.weight
    rows = slice(None) if columns else chunk_rows(chunk, weight.shape[0])
    return weight[rows], (bias[rows] if bias is not None else None)


def _digest(host: nn.Module, chunk: tuple[int, int] | None, columns: bool) -> str:
    weight, bias = region(host, chunk, columns)
    if weight is None:
        weight = host.weight.data  # the packed 4-bit bytes
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (weight, bias):
        if tensor is not None:
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def fold(host: nn.Module, linear: LinearMap, factor: float, chunk: tuple[int, int] | None,
         columns: bool) -> tuple[MergeRecord, float | None]:
    """Fold s·Δ into `host`; returns the record that undoes it and, for a 4-bit weight, the max abs rounding error
    of requantizing. `columns`: h is the host's input (an activation site), so the fold scales its columns."""
    weight, bias = region(host, chunk, columns)
    weight_copy = None if weight is None else weight.detach().to("cpu", copy=True)
    bias_copy = None if bias is None else bias.detach().to("cpu", copy=True)
    error, undo = None, None
    if weight is None:
        if linear.bias is not None:
            bias += (factor * linear.bias).to(bias.dtype)
        # ΔW in float32: add_to_4bit adds it to the dequantized float32 weight. (The bias's dtype is not the weight's:
        # bitsandbytes casts a 4-bit layer's bias to the compute dtype, and bf16 would round ΔW before the add.)
        error, undo = add_to_4bit(host, chunk_rows(chunk, host.out_features), (factor * linear.weight).float())
    else:
        _apply(host, linear, factor, chunk, columns, +1)
    record = MergeRecord(weight_copy, bias_copy, _digest(host, chunk, columns), linear.detached(), factor, undo)
    return record, error


@torch.no_grad()
def unfold(host: nn.Module, record: MergeRecord, chunk: tuple[int, int] | None, columns: bool, name: str) -> None:
    """Put back the region fold() saved (bit-exact); if it was changed since, apply the recorded fold's inverse."""
    weight, bias = region(host, chunk, columns)
    if _digest(host, chunk, columns) == record.digest:
        if weight is None:
            restore_4bit(host, record.undo_4bit)
        else:
            weight.copy_(record.weight.to(weight.device))
        if record.bias is not None:
            bias.copy_(record.bias.to(bias.device))
        return
    owner = name.rpartition(".")[0]
    if weight is None:
        raise AttachError(f"unmerge: the 4-bit weight of '{owner}' changed after merge(); it cannot be restored")
    warnings.warn(f"unmerge: the weights of '{owner}' changed after merge(); undoing the merged ΔW by its inverse "
                  "(not bit-exact)", stacklevel=4)
    _apply(host, record.linear, record.factor, chunk, columns, -1)


def _apply(host: nn.Module, linear: LinearMap, factor: float, chunk: tuple[int, int] | None, columns: bool,
           sign: int) -> None:
    weight, bias = region(host, chunk, columns)
    dtype = weight.dtype
    device = weight.device
    delta_b = None if linear.bias is None else (factor * linear.bias).to(dtype=dtype, device=device)
    if not linear.diagonal:  # parallel at a projection: W += s·M, b += s·c
        weight += sign * (factor * linear.weight).to(dtype=dtype, device=device)
        if delta_b is not None:
            bias += sign * delta_b
        return
    scale = (1 + factor * linear.weight).to(dtype=dtype, device=device)
    if columns:  # h is the host's input: u' = scale⊙u + c, so W' = W·diag(scale), b' = b + W·c
        if sign > 0 and delta_b is not None:
            bias += weight @ delta_b
        if sign > 0:
            weight.mul_(scale[None, :])
        else:
            weight.div_(scale[None, :])
        if sign < 0 and delta_b is not None:
            bias -= weight @ delta_b
        return
    if sign > 0:
        weight.mul_(scale[:, None])
    else:
        weight.div_(scale[:, None])
    if bias is not None:
        shift = 0 if delta_b is None else delta_b
        if sign > 0:
            bias.mul_(scale).add_(shift)
        else:
            bias.sub_(shift).div_(scale)


__all__ = ["LinearMap", "MergeRecord", "chunk_rows", "fold", "region", "unfold"]
