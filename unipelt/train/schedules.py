"""Learning-rate schedules from transformers (warm-up, then linear / cosine / constant / inverse-sqrt).

transformers.optimization is imported on first use only: it pulls in its Trainer utilities (a few seconds), which
the config checks and `--cfg job` should not pay for.
"""

from __future__ import annotations

import logging

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..errors import allowed
from .config import SCHEDULES


def make_schedule(name: str, optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LRScheduler:
    """transformers' schedule `name`; it scales each parameter group's own rate, so per-module rates keep their ratio."""
    if name not in SCHEDULES:  # trainer config validation makes this unreachable from the app
        raise ValueError(f"unknown schedule {name!r} (allowed: {allowed(SCHEDULES)})")
    # transformers.optimization imports peft, and peft bitsandbytes, whose CPU backend warns once that the optional
    # `kernels` package is absent: noise for a run that uses no 4-bit layer, so that one logger is quietened.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from transformers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
