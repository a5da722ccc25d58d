"""What each process feeds the model at each step: its micro-batches of an epoch, moved to its device, under the
run's mixed-precision context."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from . import distributed
from .config import TrainConfig
from .seeding import epoch_order


def micro_batches(n: int, seed: int, epoch: int, cfg: TrainConfig, info: distributed.Dist) -> list[list[int]]:
    """This process's example indices for each micro-batch of `epoch`. A global batch of batch_size * processes is
    cut into per-process slices; with several processes an incomplete last global batch is dropped so that every
    process holds equal slices (which makes DDP's averaged gradient that of the whole global batch)."""
    order = epoch_order(n, seed, epoch)
    size = cfg.batch_size * info.world_size
    chunks = [order[i : i + size] for i in range(0, n, size)]
    if info.enabled and chunks and len(chunks[-1]) < size:
        chunks.pop()
    return [c[info.rank * cfg.batch_size : (info.rank + 1) * cfg.batch_size] if info.enabled else c for c in chunks]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)  # fit() allows bf16 / fp16 on CUDA only
