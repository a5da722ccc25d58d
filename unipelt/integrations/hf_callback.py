"""UnipeltCallback: drives an attached method's training contract (unipelt.optim) from transformers' Trainer, and
from any Trainer subclass that keeps its training loop (TRL's SFTTrainer and the like).

Each part of the contract runs where unipelt's own loop runs it (unipelt/train/loop.py), at these points of the
Trainer's step (transformers 5.15-5.25: forward and backward of each micro-batch, clip, optimizer.step(),
scheduler, model.zero_grad()):

- `on_step_begin`: the regulariser's gradient (AdaLoRA's orthogonality term) is added into `.grad`, once per
  optimizer step, before the micro-batches' backward passes. unipelt's loop adds the regulariser to every
  micro-batch's loss divided by their count, which is the same gradient (the regulariser reads only the adapter,
  which does not change within a step); adding it here also puts it under the Trainer's gradient clipping, under
  every way the Trainer scales a micro-batch's loss (gradient accumulation, `num_items_in_batch`, several
  processes), and outside DDP's reduction (every process adds the same term). The fp16 grad scaler's scale is
  applied when there is one. The loss the Trainer logs is the task loss; the regulariser is logged beside it.
- `on_optimizer_step`: `unipelt.optim.on_optimizer_step(model, global_step + 1, max_steps)`, after
  optimizer.step() and before the gradients are cleared (AdaLoRA scores that step's gradients).
- `on_log`: `unipelt.optim.training_metrics` under `unipelt/<key>` with every training log (UnipeltTrainer adds
  them before any reporting callback sees the logs; a plain Trainer's earlier callbacks miss them).
- `on_save` / `on_train_begin`: the method's training state (AdaLoRA's importance averages and rank masks) is
  written into each checkpoint folder (unipelt_resume.pt) and put back when a run resumes; a resume whose
  checkpoint lacks it stops with one line rather than restart that state in silence.

A step taken without `on_step_begin` (a Trainer subclass with its own loop) stops with one line; so do DeepSpeed and
Trainer-managed FSDP for a method with a regulariser or training state (their gradients are partitioned away from
`.grad`); use `unipelt-train trainer.strategy=fsdp` there. With several adapters, `adapter=` names the one trained.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import compat, optim
from ..attach import is_attached
from ..errors import UnipeltError
from .resume_files import _named, has_training_state, read_resume, restore, write_resume

METRIC_PREFIX = "unipelt/"


def grad_scale(optimizer: Any) -> float:
    """The loss scale of fp16 training (accelerate's AcceleratedOptimizer keeps its GradScaler as `.scaler`), else 1."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return 1.0
    return float(scaler.get_scale())


class UnipeltCallback(TrainerCallback):
    """Pass to a Trainer as `callbacks=[UnipeltCallback()]` (UnipeltTrainer adds it itself)."""

    def __init__(self, adapter: str | None = None) -> None:
        self.adapter = adapter
        self.model: nn.Module | None = None
        self.regularised_step: int | None = None  # the global step whose regulariser gradient was added
        self.last_regularization: float | None = None
        self.integrated = False  # UnipeltTrainer logs the metrics and writes / reads the resume file itself
        self.resume_folder: Path | None = None  # where UnipeltTrainer resumed from
        self.restored = False
        self.warned: set[str] = set()

    # --- helpers ---------------------------------------------------------------------------------------------
    def attached(self, model: Any) -> nn.Module:
        inner = compat.unwrap_compiled(model)
        if inner is None or not is_attached(inner):
            raise UnipeltError(f"UnipeltCallback: the Trainer's model ({type(inner).__name__}) has no unipelt method "
                               "attached; call unipelt.attach(model, method) before creating the Trainer")
        return inner

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def metrics(self) -> dict[str, float]:
        """What a training log gains: the method's training metrics and the last regulariser value."""
        if self.model is None:
            return {}
        out = {f"{METRIC_PREFIX}{k}": v for k, v in optim.training_metrics(self.model, **_named(self.adapter)).items()}
        if self.last_regularization is not None:
            out[f"{METRIC_PREFIX}regularization_loss"] = self.last_regularization
        return out

    # --- events ----------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.model = self.attached(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model = self.attached(model)
        needs = has_training_state(self.model, self.adapter) or \
            optim.regularization_loss(self.model, **_named(self.adapter)) is not None
        if needs and (getattr(args, "deepspeed", None) or getattr(args, "fsdp", None)):
            which = "DeepSpeed" if getattr(args, "deepspeed", None) else "the Trainer's FSDP"
            raise UnipeltError(f"UnipeltCallback: method '{optim.method_of(self.model, **_named(self.adapter)).name}' "
                               f"has a regulariser or rank allocator that reads whole gradients, which {which} "
                               "partitions away from .grad; train it with unipelt-train (trainer.strategy=fsdp) or "
                               "on one process / DDP")
        if optimizer is not None:
            self._check_learning_rates(args, optimizer)
        if state.global_step > 0 and not self.restored:
            self._restore(args, state)

    def _check_learning_rates(self, args, optimizer) -> None:
        """A module spec's own `lr` must reach the optimizer (a plain Trainer's optimizer gives every parameter
        args.learning_rate: the method would train with other learning rates, in silence)."""
        wanted = {id(p): g["lr"] for g in optim.param_groups(self.model, args.learning_rate, args.weight_decay,
                                                             **_named(self.adapter)) for p in g["params"]}
        for group in optimizer.param_groups:
            lr = group.get("initial_lr", group["lr"])
            for param in group["params"]:
                if id(param) in wanted and not math.isclose(wanted[id(param)], lr, rel_tol=1e-9):
                    self._warn_once("lr", f"UnipeltCallback: a module of method "
                                          f"'{optim.method_of(self.model, **_named(self.adapter)).name}' sets its own "
                                          f"lr {wanted[id(param)]:g}, but the Trainer's optimizer trains it at {lr:g}; "
                                          "use unipelt.integrations.UnipeltTrainer (its optimizer takes "
                                          "unipelt.optim.param_groups)")
                    return

    def _restore(self, args, state) -> None:
        folder = self.resume_folder or Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        saved = read_resume(folder) if Path(folder).is_dir() else None
        if saved is None:
            if has_training_state(self.model, self.adapter):
                raise UnipeltError(f"UnipeltCallback: resuming at step {state.global_step}, but {folder} holds no "
                                   "unipelt_resume.pt with the method's training state (AdaLoRA's importance scores "
                                   "and rank masks); resuming would restart that state in silence")
            self.restored = True
            return
        restore(self.model, folder, {k: v for k, v in saved.items() if k != "trainable"}, self.adapter)
        self.restored = True

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        model = self.model
        with torch.enable_grad():
            reg = optim.regularization_loss(model, **_named(self.adapter))
            if reg is not None:
                params = [p for p in model.parameters() if p.requires_grad]
                scale = grad_scale(optimizer)
                # autograd.grad touches no .grad and runs no DDP reduction hook; the sum below is the step's term
                grads = torch.autograd.grad(reg * scale if scale != 1.0 else reg, params, allow_unused=True)
                with torch.no_grad():
                    for param, grad in zip(params, grads):
                        if grad is None:
                            continue
                        if param.grad is None:
                            param.grad = grad.to(param.dtype)
                        else:
                            param.grad.add_(grad.to(param.grad.dtype))
                self.last_regularization = float(reg.detach())
        self.regularised_step = state.global_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if self.regularised_step != state.global_step:
            raise UnipeltError(f"UnipeltCallback: optimizer step {step} was taken without on_step_begin, so the "
                               "method's regulariser was not added; this Trainer runs its own training loop, which "
                               "the callback cannot drive")
        optim.on_optimizer_step(self.model, step, state.max_steps, **_named(self.adapter))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.integrated or logs is None or "loss" not in logs:
            return
        extra = self.metrics()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if self.integrated or self.model is None or not has_training_state(self.model, self.adapter):
            return
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            self._warn_once("save", f"UnipeltCallback: checkpoint folder {folder} not found, so the method's "
                                    "training state was not saved with it and a resume from it will stop; "
                                    "use unipelt.integrations.UnipeltTrainer")
            return
        write_resume(self.model, folder, with_weights=False, name=self.adapter)


__all__ = ["UnipeltCallback", "grad_scale"]
