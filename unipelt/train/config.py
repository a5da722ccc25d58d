"""TrainConfig: every knob of the training loop. It is also the schema of the Hydra `trainer` group, so a misspelt
key (`trainer.lr_rate=...`) is an error that names it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import UnipeltError, allowed

# transformers' curves; polynomial: power 1 down to 1e-7 (what He et al.'s scripts use)
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt", "polynomial")
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")  # with several processes: replicate the model (DDP) or shard it (FSDP2)


@dataclass
class TrainConfig:
    lr: float = 1e-3  # modules whose spec sets `lr` (e.g. prefix vs adapter) keep their own
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    label_smoothing: float = 0.0  # cross-entropy against (1 - e) one-hot + e uniform, as transformers' Trainer
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; > 0 overrides epochs
    batch_size: int = 32  # per process and micro-step; the global batch is batch_size * processes * grad_accum
    eval_batch_size: int = 64
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 turns clipping off
    scheduler: str = "linear"
    warmup_ratio: float = 0.06
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    precision: str = "fp32"  # bf16 / fp16 autocast need CUDA
    device: str = "auto"
    strategy: str = "ddp"  # several processes: ddp (a whole model per process) or fsdp (sharded, FSDP2)
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end of every epoch
    eval_split: Optional[str] = None  # the split that picks the best checkpoint; None: the task's first
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints; 0: at every evaluation
    # ...and at least every this many minutes (adapters and optimizer state only: cheap), so that a run killed
    # between evaluations can be resumed; 0: only by steps / evaluations
    checkpoint_minutes: float = 2.0
    save_best: bool = True  # keep the best adapter (adapter-only, unipelt.save_adapter) in best_adapter/
    resume: bool = False  # continue from <output dir>/checkpoints/last.pt (an error when there is none)
    # stop as diverged when the mean loss of the last 10 steps exceeds this many times that of the first 10
    # (NaN / inf always stop a run); 0: only NaN / inf
    divergence_factor: float = 10.0
    log_every: int = 10
    progress: bool = True
    num_workers: int = 0
    deterministic: bool = False
    max_new_tokens: Optional[int] = None  # generation length for generative evaluation
    # data size (passed to the task)
    max_length: int = 128
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None


def check(cfg: TrainConfig) -> None:
    """One clear error naming the key, before anything is loaded."""
    for key, value in vars(cfg).items():  # NaN passes every comparison below unnoticed; inf is never meant
        if isinstance(value, float) and not math.isfinite(value):
            raise UnipeltError(f"trainer.{key} must be a finite number, got {value!r}")
    positive = {"lr": cfg.lr, "batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size,
                "grad_accum": cfg.grad_accum, "max_length": cfg.max_length, "log_every": cfg.log_every}
    for key, value in positive.items():
        if not value > 0:
            raise UnipeltError(f"trainer.{key} must be positive, got {value!r}")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise UnipeltError(f"trainer: epochs ({cfg.epochs}) or max_steps ({cfg.max_steps}) must be positive")
    nonneg = {"checkpoint_minutes": cfg.checkpoint_minutes, "divergence_factor": cfg.divergence_factor,
              "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "warmup_steps": cfg.warmup_steps,
              "eval_every": cfg.eval_every, "checkpoint_every": cfg.checkpoint_every,
              "early_stopping_patience": cfg.early_stopping_patience, "num_workers": cfg.num_workers}
    for key, value in nonneg.items():
        if value < 0:
            raise UnipeltError(f"trainer.{key} must be >= 0, got {value!r}")
    for key in ("adam_beta1", "adam_beta2", "label_smoothing"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise UnipeltError(f"trainer.{key} must be in [0, 1), got {getattr(cfg, key)!r}")
    if cfg.max_new_tokens is not None and (isinstance(cfg.max_new_tokens, bool) or cfg.max_new_tokens < 1):
        raise UnipeltError(f"trainer.max_new_tokens must be a positive number of tokens or null (the task's "
                           f"default), got {cfg.max_new_tokens!r}")
    if not cfg.adam_epsilon > 0:
        raise UnipeltError(f"trainer.adam_epsilon must be positive, got {cfg.adam_epsilon!r}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise UnipeltError(f"trainer.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio!r}")
    if cfg.scheduler not in SCHEDULES:
        raise UnipeltError(f"trainer.scheduler: unknown value '{cfg.scheduler}' (allowed: {allowed(SCHEDULES)})")
    if cfg.precision not in PRECISIONS:
        raise UnipeltError(f"trainer.precision: unknown value '{cfg.precision}' (allowed: {allowed(PRECISIONS)})")
    if cfg.strategy not in STRATEGIES:
        raise UnipeltError(f"trainer.strategy: unknown value '{cfg.strategy}' (allowed: {allowed(STRATEGIES)})")
    if cfg.strategy == "fsdp" and cfg.precision == "fp16":
        raise UnipeltError("trainer.precision 'fp16' is not supported with trainer.strategy 'fsdp' (its loss "
                           "scaler is not shard-aware); use precision=bf16 or fp32")


def position_limit(config: Any, reserved: int = 0) -> int | None:
    """How many tokens the model's position embeddings allow (None: no fixed limit, e.g. T5's relative positions),
    less `reserved` (positions the method inserts into every sequence: MethodSpec.input_tokens). RoBERTa-style models start positions at pad_token_id + 1."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or getattr(config, "model_type", "") in ("t5", "mt5", "umt5"):
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit - reserved


def check_max_length(cfg: TrainConfig, config: Any, reserved: int = 0, model: str = "the model") -> None:
    """trainer.max_length must fit the model's positions (else the run crashes at its first long batch)."""
    limit = position_limit(config, reserved)
    if limit is not None and cfg.max_length > limit:
        extra = f" after {reserved} inserted by the method" if reserved else ""
        raise UnipeltError(f"trainer.max_length {cfg.max_length} exceeds the {limit} positions of {model}{extra}; "
                           f"set trainer.max_length<={limit}")
