"""Data parallelism for one run: torchrun or `accelerate launch` start one process per device and set RANK /
WORLD_SIZE / LOCAL_RANK; each process trains on its own slice of every global batch and DDP averages gradients.
With one process everything here is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UnipeltError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' takes CUDA when there is one; 'cuda' without one is an error, not a silent CPU run."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnipeltError(f"trainer.device '{preference}': no CUDA device is available (use 'cpu' or 'auto')")
        return torch.device("cuda", local_rank) if preference == "cuda" else torch.device(preference)
    if preference != "cpu":
        raise UnipeltError(f"trainer.device: unknown value '{preference}' (allowed: auto, cpu, cuda, cuda:N)")
    return torch.device("cpu")


def _export_slurm_ranks() -> None:
    """A SLURM job with several tasks (hydra/launcher=slurm with tasks_per_node or nodes > 1) starts one process per
    task without torchrun: submitit's TorchDistributedEnvironment sets RANK, WORLD_SIZE, LOCAL_RANK and the
    rendezvous address from SLURM's variables. Every task keeps seeing all of its node's GPUs (LOCAL_RANK picks)."""
    # SLURM_STEP_NUM_TASKS: set by srun (which starts submitit's tasks), not in a plain shell of an allocation
    if "RANK" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise UnipeltError("a SLURM job with several tasks needs submitit (a dependency of unipelt) or "
                           "torchrun to set RANK / WORLD_SIZE") from None
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun / accelerate / a multi-task SLURM job (WORLD_SIZE > 1),
    else a single process."""
    _export_slurm_ranks()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def wrap(model: torch.nn.Module, info: Dist) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Frozen base weights have no gradients; DDP only reduces the trainable ones.
    return DistributedDataParallel(model, device_ids=ids)


def mean(value: float, info: Dist) -> float:
    """The mean of `value` over all processes."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world_size


def broadcast(obj: Any, info: Dist) -> Any:
    """Rank 0's `obj` on every process (e.g. the evaluation result, computed once)."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
