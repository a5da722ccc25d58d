"""Whole tensors from parameters that may be sharded (FSDP2 keeps each parameter as a DTensor shard between
forwards). Code outside a model's forward that reads parameters by value (AdaLoRA's importance scores and its
orthogonal regulariser) reads them through `full`, so it computes the same numbers on every rank as one process
does; on a plain tensor it is the identity."""

from __future__ import annotations

import torch


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (differentiable; identical on every rank), else `tensor`."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor


__all__ = ["full"]
