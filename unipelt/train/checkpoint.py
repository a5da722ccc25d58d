"""Resumable checkpoints and the best adapter, both written atomically (write to a temporary name, then rename).

A resumable checkpoint (`checkpoints/last.pt`) holds what the optimizer updates (the trainable parameters, with
a prefix's reparameterisation MLP unfolded), the optimizer, scheduler and grad-scaler states, every RNG state,
the data position (epoch and micro-batch index), the trainer's bookkeeping (best score, patience, history) and the
method's own training state (unipelt.optim.training_state: AdaLoRA's importance averages and rank masks).
Frozen base weights are never saved: they come back from the model's own files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnipeltError
from ..io import atomic_write, save_adapter

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST_ADAPTER = "best_adapter"
REQUIRED_KEYS = ("trainable", "optimizer", "scheduler", "rng", "step", "epoch", "micro", "total_steps", "seed")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter the optimizer updates, by name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        culprit = (missing or extra)[0]
        raise UnipeltError(
            f"checkpoint does not match the model: {len(missing)} trainable tensors missing, {len(extra)} unexpected "
            f"(e.g. '{culprit}'); was it written with another method or model?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(output_dir: Path, state: dict[str, Any]) -> Path:
    path = Path(output_dir) / CHECKPOINT_DIR / LAST
    atomic_torch_save(state, path)
    return path


def find_checkpoint(output_dir: Path) -> Path | None:
    path = Path(output_dir) / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # weights_only=False: the file holds RNG states (NumPy arrays, Python tuples) that this run itself wrote.
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise UnipeltError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UnipeltError(f"checkpoint {path} is not a unipelt training checkpoint (no '{missing[0]}')")
    return saved


def save_best_adapter(model: nn.Module, output_dir: Path) -> Path:
    """unipelt.save_adapter into a fresh directory, then swap it in, so `best_adapter/` is always complete."""
    final = Path(output_dir) / BEST_ADAPTER
    tmp = final.with_name(f".{BEST_ADAPTER}.tmp{os.getpid()}")
    old = final.with_name(f".{BEST_ADAPTER}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
