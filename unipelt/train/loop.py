"""The training loop: AdamW over unipelt.param_groups, a learning-rate schedule from transformers, autocast,
gradient accumulation and clipping, periodic evaluation, best adapter, early stopping, resumable checkpoints,
NaN/inf detection, data parallelism.

The loop talks to the method only through unipelt.optim (param_groups, regularization_loss, on_optimizer_step,
training_metrics) and to the task only through the PreparedTask interface (train, eval_splits, collate,
evaluate, main_metric, greater_is_better), so it works for any method and any task.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from .. import compat, optim
from ..errors import UnipeltError, allowed
from ..tasks.losses import token_cross_entropy
from . import checkpoint as ckpt
from . import distributed, runfolder, sharding
from .batching import autocast, micro_batches, to_device
from .config import TrainConfig, check, check_max_length
from .optimizers import make_optimizer
from .schedules import make_schedule
from .seeding import rng_state, set_rng_state

LogFn = Callable[[dict[str, float], int], None]


class TrainingDiverged(UnipeltError):
    """The loss became NaN or infinite, or exploded (trainer.divergence_factor); the run stops, its last checkpoint
    (if any) is kept."""


class TrainingInterrupted(UnipeltError):
    """Ctrl-C (SIGINT) or SIGTERM: the run stopped after saving a checkpoint at the last completed step."""


DIVERGENCE_WINDOW = 10  # steps averaged at the start and at the end for trainer.divergence_factor


@dataclass
class TrainResult:
    metrics: dict[str, float]  # "<split>/<metric>" for every evaluation split, from the best state
    score: float  # the main metric on the selection split, at the best evaluation
    main_metric: str  # "<split>/<metric>" that `score` is
    best_step: int
    steps: int
    train_loss: float  # mean training loss over the run's last `log_every` steps
    stopped_early: bool = False
    resumed_from: int | None = None  # the step a resumed run started from
    history: list[dict[str, float]] = field(default_factory=list)  # every evaluation, with its step


class _Loop:
    def __init__(self, model, task, cfg: TrainConfig, output_dir: Path, seed: int, log: LogFn | None,
                 info: distributed.Dist):
        self.model, self.task, self.cfg, self.seed, self.info = model, task, cfg, seed, info
        self.sharded = sharding.is_sharded(model)  # FSDP2: every rank evaluates, saves and checkpoints together
        self.output_dir = Path(output_dir)
        self.log = log if (log is not None and info.is_main) else (lambda metrics, step: None)
        splits = list(task.eval_splits)
        self.eval_split = cfg.eval_split or (splits[0] if splits else None)
        if self.eval_split not in task.eval_splits:
            raise UnipeltError(f"trainer.eval_split: unknown split '{cfg.eval_split}' (allowed: {allowed(splits)})")
        self.main_key = f"{self.eval_split}/{task.main_metric}"
        n_micro = len(micro_batches(len(task.train), seed, 0, cfg, info))
        if n_micro == 0:
            raise UnipeltError(f"task '{getattr(task, 'name', '?')}': {len(task.train)} training examples are fewer "
                               f"than one global batch ({cfg.batch_size} x {info.world_size} processes)")
        steps_per_epoch = math.ceil(n_micro / cfg.grad_accum)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        groups = optim.param_groups(model, cfg.lr, cfg.weight_decay)
        for group in groups:
            group.pop("names", None)
        self.optimizer = make_optimizer(optim.method_of(model).optimizer, groups, cfg.lr,
                                        (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon)
        if cfg.label_smoothing and getattr(task, "kind", None) == "regression":
            raise UnipeltError("trainer.label_smoothing applies to classification and generation, not regression")
        self.causal = getattr(task, "architecture", None) == "decoder"
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = make_schedule(cfg.scheduler, self.optimizer, warmup, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        # bookkeeping that a checkpoint carries
        self.step = self.epoch = self.micro = self.best_step = self.bad_evals = 0
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.recent_losses: list[float] = []
        self.resumed_from: int | None = None
        self.stopped_early = False
        self.first_losses: list[float] = []  # the first DIVERGENCE_WINDOW step losses
        self.window: list[float] = []  # the last DIVERGENCE_WINDOW step losses
        self.saved_step: int | None = None  # the step of the checkpoint in the folder (None: none written)
        self.last_save = time.monotonic()
        # RNG state at the end of the last fully processed step (None while a step is being processed): what an
        # interrupt saves, so that a resumed run replays exactly what the interrupted one would have done
        self.boundary_rng: dict[str, Any] | None = rng_state()
        self.settings: dict[str, Any] = {}  # what a resumed run must share with its checkpoint (set by fit)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        state = {
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_state(), "step": self.step, "epoch": self.epoch, "micro": self.micro,
            "best_score": self.best_score, "best_step": self.best_step, "bad_evals": self.bad_evals,
            "best_state": self.best_state, "history": self.history, "recent_losses": self.recent_losses,
            "total_steps": self.total_steps, "seed": self.seed, "first_losses": self.first_losses,
            "window": self.window, "settings": self.settings, "method_state": optim.training_state(self.model),
        }
        if not self.sharded:  # a sharded model and optimizer go to torch.distributed.checkpoint files instead
            state.update(trainable=ckpt.trainable_state(self.model), optimizer=self.optimizer.state_dict())
        return state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return sharding.local_trainable_state(self.model) if self.sharded else ckpt.trainable_state(self.model)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.sharded:
            sharding.load_local_trainable_state(self.model, state)
        else:
            ckpt.load_trainable_state(self.model, state)

    def restore(self, path: Path) -> None:
        if self.sharded:
            saved = sharding.load_checkpoint(path, self.model, self.optimizer, self.info)
        else:
            saved = ckpt.load_checkpoint(path)
        if "settings" in saved:  # checkpoints of older versions carry only the step count and the seed
            runfolder.refuse_changed_settings(saved["settings"], self.settings, f"checkpoint {path}")
        if saved.get("total_steps") != self.total_steps or saved.get("seed") != self.seed:
            raise UnipeltError(f"checkpoint {path} was written for {saved.get('total_steps')} steps with seed "
                               f"{saved.get('seed')}; this run has {self.total_steps} steps and seed {self.seed}")
        if not self.sharded:
            ckpt.load_trainable_state(self.model, saved["trainable"])
            self.optimizer.load_state_dict(saved["optimizer"])
        optim.load_training_state(self.model, saved.get("method_state", {}), f"checkpoint {path}")
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        for key in ("step", "epoch", "micro", "best_score", "best_step", "bad_evals", "best_state", "history",
                    "recent_losses"):
            setattr(self, key, saved[key])
        self.first_losses, self.window = saved.get("first_losses", []), saved.get("window", [])
        set_rng_state(saved["rng"])
        self.boundary_rng = saved["rng"]
        self.resumed_from = self.saved_step = self.step

    def save(self) -> None:
        if self.sharded:
            sharding.save_checkpoint(self.output_dir, self.model, self.optimizer, self.state(), self.info)
        elif self.info.is_main:
            ckpt.save_checkpoint(self.output_dir, self.state())
        distributed.barrier(self.info)
        self.saved_step, self.last_save = self.step, time.monotonic()

    def save_on_interrupt(self) -> str:
        """Save the state of the last fully processed step, if the interrupt came outside one's processing."""
        # sharded: saving is collective, and the ranks may be interrupted at different points: keep the last one
        if self.boundary_rng is None or self.saved_step == self.step or not self.info.is_main or self.sharded:
            return self.checkpoint_note()
        state = self.state()
        state["rng"] = self.boundary_rng
        path = ckpt.save_checkpoint(self.output_dir, state)
        self.saved_step = self.step
        return f"checkpoint of step {self.step} saved to {path}"

    def checkpoint_note(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the checkpoint of step {self.saved_step} is kept"

    # --- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        result = None
        if self.info.is_main or self.sharded:  # a sharded model needs every rank in its forward
            self.model.eval()
            gathered = sharding.evaluating(self.model) if self.sharded else contextlib.nullcontext()
            with torch.no_grad(), autocast(self.cfg, self.info.device), gathered:
                raw = self.task.evaluate(self.model, split, batch_size=self.cfg.eval_batch_size,
                                         device=self.info.device, max_new_tokens=self.cfg.max_new_tokens)
            self.model.train()
            result = {f"{split}/{k}": float(v) for k, v in raw.items()}
        return distributed.broadcast(result, self.info)

    def evaluate_and_track(self) -> bool:
        """Evaluate the selection split; keep the best state; True when early stopping says stop."""
        metrics = self.evaluate(self.eval_split)
        if self.main_key not in metrics:
            raise UnipeltError(f"task main_metric '{self.task.main_metric}' is not among the evaluated metrics "
                               f"({', '.join(sorted(metrics))})")
        self.history.append({"step": self.step, **metrics})
        self.log(metrics, self.step)
        score = metrics[self.main_key]
        better = self.best_score is None or self._rank(score) > self._rank(self.best_score)
        if better:
            self.best_score, self.best_step, self.bad_evals = score, self.step, 0
            self.best_state = self.trainable_state()
            if self.cfg.save_best and self.sharded:
                sharding.save_adapter_with(self.model, self.info, ckpt.save_best_adapter, self.output_dir)
            elif self.cfg.save_best and self.info.is_main:
                ckpt.save_best_adapter(self.model, self.output_dir)
        else:
            self.bad_evals += 1
        patience = self.cfg.early_stopping_patience
        return bool(patience) and self.bad_evals >= patience

    def _rank(self, score: float) -> float:
        """Larger is better; NaN (e.g. Pearson of constant predictions) is the worst score of all."""
        if math.isnan(score):
            return -math.inf
        return score if self.task.greater_is_better else -score

    # --- training ----------------------------------------------------------------------------------------------
    def check_divergence(self, loss: float) -> None:
        step = self.step + 1
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at step {step}; stopped ({self.checkpoint_note()})")
        if len(self.first_losses) < DIVERGENCE_WINDOW:
            self.first_losses.append(loss)
        self.window = (self.window + [loss])[-DIVERGENCE_WINDOW:]
        factor = self.cfg.divergence_factor
        if factor and len(self.first_losses) == DIVERGENCE_WINDOW and step >= 2 * DIVERGENCE_WINDOW:
            start, now = sum(self.first_losses) / DIVERGENCE_WINDOW, sum(self.window) / DIVERGENCE_WINDOW
            if start > 0 and now > factor * start:
                raise TrainingDiverged(
                    f"loss exploded at step {step}: mean {now:.4g} over the last {DIVERGENCE_WINDOW} steps, "
                    f"{now / start:.3g} times the first {DIVERGENCE_WINDOW} steps' {start:.4g} "
                    f"(trainer.divergence_factor={factor:g}); stopped ({self.checkpoint_note()})")

    def optimizer_step(self, loss: float) -> None:
        loss = distributed.mean(loss, self.info)
        self.boundary_rng = None  # from here until the step is fully processed, an interrupt saves nothing new
        self.check_divergence(loss)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        optim.on_optimizer_step(self.model, self.step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.recent_losses = (self.recent_losses + [loss])[-self.cfg.log_every :]
        if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            metrics = {"train/loss": sum(self.recent_losses) / len(self.recent_losses),
                       "train/lr": self.scheduler.get_last_lr()[0], "train/epoch": self.epoch}
            metrics.update({f"train/{k}": v for k, v in optim.training_metrics(self.model).items()})
            self.log(metrics, self.step)

    def loss(self, wrapped: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        outputs = wrapped(**batch)
        if not self.cfg.label_smoothing:
            return outputs.loss
        return token_cross_entropy(outputs.logits, batch["labels"], self.cfg.label_smoothing, self.causal)

    def time_to_save(self) -> bool:
        minutes = self.cfg.checkpoint_minutes
        due = bool(minutes) and time.monotonic() - self.last_save >= 60 * minutes
        return bool(distributed.broadcast(due, self.info))  # every process must agree (save has a barrier)

    def run(self, wrapped: torch.nn.Module) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.info.is_main))
        self.model.train()
        while self.step < self.total_steps and not self.stopped_early:
            batches = micro_batches(len(self.task.train), self.seed, self.epoch, cfg, self.info)
            # its own generator: creating the iterator draws a seed, which must not move the global RNG (dropout)
            loader = DataLoader(self.task.train, batch_sampler=batches[self.micro :], collate_fn=self.task.collate,
                                num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(self.epoch))
            accumulated, start = 0.0, self.micro
            for offset, batch in enumerate(loader):
                index = start + offset
                group_start = index - index % cfg.grad_accum
                in_group = min(cfg.grad_accum, len(batches) - group_start)
                last = index == group_start + in_group - 1
                if self.sharded:
                    sync = sharding.gradient_sync(wrapped, enabled=last)
                else:
                    sync = contextlib.nullcontext() if (last or not self.info.enabled) else wrapped.no_sync()
                with sync:
                    with autocast(cfg, self.info.device):
                        loss = self.loss(wrapped, to_device(batch, self.info.device))
                        extra = optim.regularization_loss(self.model)
                        if extra is not None:
                            loss = loss + extra
                    scaled = loss / in_group
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                accumulated += loss.detach().float().item() / in_group
                if not last:
                    continue
                self.optimizer_step(accumulated)
                accumulated, self.micro = 0.0, index + 1
                bar.update(1)
                bar.set_postfix(loss=f"{self.recent_losses[-1]:.4f}")
                end_of_epoch = self.micro >= len(batches)
                due = (self.step % cfg.eval_every == 0) if cfg.eval_every else end_of_epoch
                finished = self.step >= self.total_steps
                evaluated = due or finished
                if evaluated:
                    self.stopped_early = self.evaluate_and_track() and not finished
                    if self.best_score is not None:
                        bar.set_postfix(loss=f"{self.recent_losses[-1]:.4f}", best=f"{self.best_score:.4f}")
                if end_of_epoch:
                    self.epoch, self.micro = self.epoch + 1, 0
                every = cfg.checkpoint_every
                if (every and self.step % every == 0) or (not every and evaluated) or finished or self.stopped_early \
                        or self.time_to_save():
                    self.save()
                self.boundary_rng = rng_state()
                if finished or self.stopped_early:
                    break
        bar.close()

    def final_metrics(self) -> dict[str, float]:
        """Every evaluation split, on the best state (the selection split's numbers come from its evaluation)."""
        if self.best_state is not None:
            self.load_trainable_state(self.best_state)
        best = next((h for h in self.history if h["step"] == self.best_step), {})
        metrics = {k: v for k, v in best.items() if k != "step"}
        for split in self.task.eval_splits:
            if split != self.eval_split:
                metrics.update(self.evaluate(split))
        return metrics


def fit(model: torch.nn.Module, task: Any, cfg: TrainConfig, output_dir: str | Path, *, seed: int = 0,
        log: LogFn | None = None, info: distributed.Dist | None = None,
        settings: dict[str, Any] | None = None) -> TrainResult:
    """Train the attached method of `model` on `task`; returns the best state's metrics (the model ends in it).
    `settings`: the caller's further settings (flat) that a resumed run must keep (the Hydra app's config)."""
    check(cfg)
    info = info or distributed.setup(cfg.device)
    if cfg.precision != "fp32" and info.device.type != "cuda":
        raise UnipeltError(f"trainer.precision '{cfg.precision}' needs a CUDA device (this run is on "
                           f"{info.device.type}); use precision=fp32")
    check_max_length(cfg, model.config, optim.method_of(model).input_tokens(),
                     f"model '{compat.name_or_path(model.config) or 'here'}'")
    output_dir = Path(output_dir)
    lock = runfolder.lock_folder(output_dir) if info.is_main else None
    try:
        fsdp = cfg.strategy == "fsdp" and info.enabled
        found = runfolder.check_folder(cfg, output_dir, sharding.checkpoint_finder(fsdp),
                                       sharding.SHARDED_CHECKPOINT if fsdp else ckpt.LAST)
        if not fsdp or sharding.holds_4bit(model):
            model.to(info.device)  # else fully_shard moves one layer at a time: the model never sits whole on a device
        if fsdp:  # before the optimizer exists: sharding replaces the parameters
            sharding.check_optimizer(optim.method_of(model).optimizer)
            sharding.shard(model, info, cfg.precision)
        loop = _Loop(model, task, cfg, output_dir, seed, log, info)
        loop.settings = runfolder.run_settings(model, task, cfg, seed, settings)
        if found is not None:
            loop.restore(found)
        wrapped = model if fsdp else distributed.wrap(model, info)
        try:
            with runfolder.sigterm_as_interrupt():
                loop.run(wrapped)
        except KeyboardInterrupt:
            note = loop.save_on_interrupt()
            raise TrainingInterrupted(f"interrupted at step {loop.step}/{loop.total_steps}; {note}; continue with "
                                      "trainer.resume=true") from None
        metrics = loop.final_metrics()
    finally:
        if lock is not None:
            runfolder.unlock_folder(lock)
    return TrainResult(metrics=metrics, score=metrics[loop.main_key], main_metric=loop.main_key,
                       best_step=loop.best_step, steps=loop.step,
                       train_loss=sum(loop.recent_losses) / max(1, len(loop.recent_losses)),
                       stopped_early=loop.stopped_early, resumed_from=loop.resumed_from, history=loop.history)
