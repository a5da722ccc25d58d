"""What a Hugging Face Trainer checkpoint needs from unipelt to resume exactly: `unipelt_resume.pt` in the checkpoint
folder, beside the Trainer's own optimizer / scheduler / RNG / trainer-state files.

It holds the attached method (a resume with another method is refused in one line), the method's training state
(unipelt.optim.training_state: AdaLoRA's importance averages and rank masks, which no parameter and no
state_dict carries) and, when the checkpoint holds no model weights (UnipeltTrainer's adapter-only checkpoints),
every trainable tensor as the optimizer updates it (a prefix's reparameterisation MLP unfolded, AdaLoRA's pruned
triplets kept), which the folded adapter files beside it do not hold. Written atomically; read with
torch.load(weights_only=True), since it holds only tensors, numbers, strings and containers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import optim
from ..errors import UnipeltError
from ..spec import load_method
from ..train.checkpoint import atomic_torch_save, load_trainable_state, trainable_state

RESUME_FILE = "unipelt_resume.pt"
RESUME_FORMAT = 1


def _named(name: str | None) -> dict[str, Any]:
    """optim's `name=` keyword only when an adapter is named (one adapter: the contract as it always was)."""
    return {} if name is None else {"name": name}


def write_resume(model: nn.Module, folder: str | Path, *, with_weights: bool, name: str | None = None) -> Path:
    payload: dict[str, Any] = {"format": RESUME_FORMAT, "method": optim.method_of(model, **_named(name)).to_dict(),
                               "method_state": optim.training_state(model, **_named(name))}
    if with_weights:
        payload["trainable"] = trainable_state(model)
    path = Path(folder) / RESUME_FILE
    atomic_torch_save(payload, path)
    return path


def read_resume(folder: str | Path) -> dict[str, Any] | None:
    """The file's contents, None when the folder has none; one UnipeltError line when it is unreadable."""
    path = Path(folder) / RESUME_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UnipeltError(f"cannot read {path} ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(saved, dict) or saved.get("format") != RESUME_FORMAT or not isinstance(saved.get("method"), dict):
        raise UnipeltError(f"{path} is not a unipelt resume file of format {RESUME_FORMAT}")
    return saved


def restore(model: nn.Module, folder: str | Path, saved: dict[str, Any], name: str | None = None) -> None:
    """Check the method, then put back the trainable tensors (when the file has them) and the training state."""
    path = Path(folder) / RESUME_FILE
    here = optim.method_of(model, **_named(name))
    there = load_method(saved["method"])
    if there != here:
        raise UnipeltError(f"{path} was written for another method than the attached '{here.name}' "
                           f"({_first_difference(there.to_dict(), here.to_dict())}); resume with the method the "
                           "checkpoint was trained with")
    if "trainable" in saved:
        try:
            load_trainable_state(model, saved["trainable"])
        except UnipeltError as exc:
            raise UnipeltError(f"{path}: {exc}") from None
    optim.load_training_state(model, saved["method_state"], f"checkpoint {folder}", **_named(name))


def _first_difference(there: Any, here: Any, path: str = "method") -> str:
    """'<path>: <value> there, <value> here' for the first place two method dicts differ."""
    if isinstance(there, dict) and isinstance(here, dict):
        for key in sorted(set(there) | set(here), key=str):
            if there.get(key) != here.get(key):
                return _first_difference(there.get(key), here.get(key), f"{path}.{key}")
    if isinstance(there, (list, tuple)) and isinstance(here, (list, tuple)) and len(there) == len(here):
        for index, (a, b) in enumerate(zip(there, here)):
            if a != b:
                return _first_difference(a, b, f"{path}[{index}]")
    return f"{path}: {there!r} there, {here!r} here"


def has_training_state(model: nn.Module, name: str | None = None) -> bool:
    return bool(optim.training_state(model, **_named(name)))


__all__ = ["RESUME_FILE", "has_training_state", "read_resume", "restore", "write_resume"]
