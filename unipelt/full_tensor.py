"""Whole tensors from parameters that may be sharded (FSDP2 keeps each parameter as a DTensor shard between
forwards). Code outside a model's forward that reads parameters by value (AdaLoRA's importance scores and its
orthogonal regulariser) reads them through `full`, so it computes the same numbers on every rank as one process
does, and updates them in place through `laid_out_like`; on plain tensors both are the identity."""

from __future__ import annotations

import torch


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (differentiable; identical on every rank), else `tensor`."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor


def laid_out_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole, the same on every rank) laid out as `param` is: for a sharded parameter, a DTensor with its
    placements, each rank keeping its own part (no communication), so that in-place updates by a mask work on the
    shard; for a plain parameter, `tensor` itself."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor, mesh, param.placements, src_data_rank=None)


__all__ = ["full", "laid_out_like"]
