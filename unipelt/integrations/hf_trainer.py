"""UnipeltTrainer: transformers' Trainer with an attached unipelt method, and `unipelt_trainer(cls)` for any Trainer
subclass (TRL's SFTTrainer, DPOTrainer, ...): the same class with unipelt's integration mixed in first.

What the mixin changes, over what UnipeltCallback (added by it) drives:

- the optimizer takes `unipelt.optim.param_groups` (a module spec's own `lr`; decay on matrices only, as unipelt's
  loop), built by the class and keywords `args.optim` names (or `optimizer_cls_and_kwargs`);
- checkpoints and `save_model` write the adapter, never the base model: unipelt's files (`unipelt_adapter.json`,
  `adapter_model.safetensors`: `unipelt.load_adapter(model, folder)` loads them), PEFT's files in `peft/` where
  the method has a PEFT LoRA form (`peft.PeftModel.from_pretrained(base, folder + "/peft")`), the tokenizer and
  `training_args.bin`; a checkpoint adds `unipelt_resume.pt` (the unfolded trainable tensors and the method's
  training state) beside the Trainer's optimizer, scheduler, RNG and trainer-state files;
- `resume_from_checkpoint` and `load_best_model_at_end` read that file back (a checkpoint written by a plain
  Trainer, with the whole model, still loads as before);
- the method's training metrics reach the logs before any reporting callback sees them.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import compat, optim
from ..errors import UnipeltError
from ..io import save_adapter
from ..peft_interop import export_peft
from .hf_callback import UnipeltCallback
from .resume_files import _named, read_resume, restore, write_resume

PEFT_DIR = "peft"
# Trainer.get_optimizer_cls_and_kwargs keys that build an optimizer from the model itself (GaLore, LOMO, layer-wise):
# those, and optimizer factories, keep the Trainer's own parameter grouping (UnipeltCallback warns if a module's own
# lr is then lost)
_OWN_GROUPING = ("params", "model", "optimizer_dict")


def _export_peft_copy(model: nn.Module, folder: Path, adapter: str | None) -> bool:
    """PEFT's files in `folder` when the method has a PEFT LoRA form; False (nothing written) when it has none."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_peft(model, tmp, **_named(adapter))
    except UnipeltError:  # no PEFT equivalent (a prefix, a sequential adapter, ...): unipelt's files only
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return True


class UnipeltTrainerMixin:
    """Mix in before a transformers Trainer class: `class MyTrainer(UnipeltTrainerMixin, SFTTrainer)`."""

    def __init__(self, *args: Any, unipelt_adapter: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        callback = next((c for c in self.callback_handler.callbacks if isinstance(c, UnipeltCallback)), None)
        if callback is None:
            callback = UnipeltCallback(adapter=unipelt_adapter)
            self.add_callback(callback)
            callback.model = callback.attached(self.model)
        callback.integrated = True
        self.unipelt_callback = callback
        self._unipelt_checkpointing = False

    @property
    def unipelt_model(self) -> nn.Module:
        """The transformers model the method is attached to (inside a torch.compile wrapper, if any)."""
        return self.unipelt_callback.attached(self.model)

    # --- optimizer ---------------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        inner = compat.unwrap_compiled(self.model if model is None else model)
        given = getattr(self, "optimizer_cls_and_kwargs", None)
        cls, kwargs = given if given is not None else self.get_optimizer_cls_and_kwargs(self.args, inner)
        plain = isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)  # not a factory (Muon, Dion, ...)
        if not plain or any(key in kwargs for key in _OWN_GROUPING):
            return super().create_optimizer() if model is None else super().create_optimizer(model)
        adapter = self.unipelt_callback.adapter
        groups = optim.param_groups(inner, self.args.learning_rate, self.args.weight_decay, **_named(adapter))
        for group in groups:
            group.pop("names", None)
        wanted = optim.method_of(inner, **_named(adapter)).optimizer
        if wanted not in (None, "adamw") and wanted != str(getattr(self.args.optim, "value", self.args.optim)):
            warnings.warn(f"UnipeltTrainer: method '{optim.method_of(inner, **_named(adapter)).name}' asks for the "
                          f"optimizer '{wanted}'; the Trainer uses optim='{self.args.optim}' (pass optim='{wanted}' "
                          "to TrainingArguments to follow the method)", UserWarning, stacklevel=2)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    # --- saving --------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._unipelt_checkpointing = _internal_call
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._unipelt_checkpointing = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter only: unipelt's files, PEFT's in peft/ where the method has them, and (in a checkpoint) the
        resume file; the tokenizer and the training arguments as the Trainer writes them."""
        if not self.args.should_save:
            return
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        model, adapter = self.unipelt_model, self.unipelt_callback.adapter
        save_adapter(model, out, **_named(adapter))
        _export_peft_copy(model, out / PEFT_DIR, adapter)
        # a checkpoint: save_model(..., _internal_call=True) from _save_checkpoint, or a folder named as one
        if self._unipelt_checkpointing or re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", out.name):
            write_resume(model, out, with_weights=True, name=adapter)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)
        torch.save(self.args, out / TRAINING_ARGS_NAME)

    # --- loading -------------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        folder = Path(resume_from_checkpoint)
        saved = read_resume(folder) if folder.is_dir() else None
        self.unipelt_callback.resume_folder = folder
        if saved is None or "trainable" not in saved:  # a plain Trainer's checkpoint, with the whole model
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return  # the callback puts the training state back at on_train_begin (or says it is missing)
        restore(compat.unwrap_compiled(model if model is not None else self.model), folder, saved,
                self.unipelt_callback.adapter)
        self.unipelt_callback.restored = True

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        saved = read_resume(best) if best is not None and Path(best).is_dir() else None
        if saved is None or "trainable" not in saved:
            super()._load_best_model()
            return
        restore(self.unipelt_model, best, saved, self.unipelt_callback.adapter)

    # --- logging -------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update(self.unipelt_callback.metrics())
        super().log(logs, *args, **kwargs)


def unipelt_trainer(trainer_class: type) -> type:
    """`trainer_class` (a transformers Trainer subclass, e.g. trl.SFTTrainer) with unipelt's integration mixed in."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise UnipeltError(f"unipelt_trainer: expected a transformers Trainer class, got {trainer_class!r}")
    if issubclass(trainer_class, UnipeltTrainerMixin):
        return trainer_class
    return type(f"Unipelt{trainer_class.__name__}", (UnipeltTrainerMixin, trainer_class),
                {"__module__": __name__, "__doc__": f"{trainer_class.__name__} with unipelt's "
                 "integration (unipelt.integrations.UnipeltTrainerMixin)."})


class UnipeltTrainer(UnipeltTrainerMixin, Trainer):
    """transformers.Trainer for a model with a unipelt method attached (see the module docstring)."""


__all__ = ["PEFT_DIR", "UnipeltTrainer", "UnipeltTrainerMixin", "unipelt_trainer"]
