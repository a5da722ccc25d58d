"""Learning-rate schedules: the curves of transformers' get_scheduler (same formulas, checked against it in the
tests), written here because importing transformers.optimization pulls in its Trainer utilities (and through
them peft, bitsandbytes and torch's compiler), seconds of start-up for every job."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _constant(step: int, warmup: int, total: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, warmup: int, total: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _inverse_sqrt(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    timescale = warmup or 10_000
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


SCHEDULES = {"linear": _linear, "cosine": _cosine, "constant": _constant,
             "constant_with_warmup": _constant_with_warmup, "inverse_sqrt": _inverse_sqrt}


def make_schedule(name: str, optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """LambdaLR scaling every parameter group's own learning rate (so per-module rates keep their ratio)."""
    return LambdaLR(optimizer, partial(SCHEDULES[name], warmup=warmup_steps, total=total_steps))
