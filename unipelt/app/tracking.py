"""Experiment tracking: W&B when `logger.backend=wandb`, nothing when `none`. A W&B failure (not installed, no
network, a bad entity) is reported once as a warning and tracking goes on as a no-op: it never stops training."""

from __future__ import annotations

import logging
import netrc
import os
from typing import Any
from urllib.parse import urlparse

from ..errors import UnipeltError, allowed
from .schema import LOGGER_BACKENDS, LOGGER_MODES

log = logging.getLogger(__name__)


class Tracker:
    """No tracking: the interface every tracker has."""

    run_dir: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


def has_api_key() -> bool:
    """True when W&B can authenticate: WANDB_API_KEY, or a ~/.netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """'auto' means online with an API key and offline without; WANDB_MODE, when set, has the last word."""
    if mode not in LOGGER_MODES:
        raise UnipeltError(f"logger.mode: unknown value '{mode}' (allowed: {allowed(LOGGER_MODES)})")
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if has_api_key() else "offline"
    return mode


class WandbTracker(Tracker):
    def __init__(self, *, project: str, entity: str | None, mode: str, group: str, job_type: str, name: str,
                 tags: list[str], config: dict[str, Any], directory: str, main_metric: str, greater_is_better: bool):
        import wandb

        self._wandb = wandb
        os.makedirs(directory, exist_ok=True)
        # finish_previous: many jobs may share one process (the basic launcher); each job is its own run.
        self.run = wandb.init(project=project, entity=entity, mode=mode, group=group, job_type=job_type, name=name,
                              tags=tags, config=config, dir=directory, reinit="finish_previous")
        self.run_dir = getattr(self.run.settings, "sync_dir", None) or getattr(self.run, "dir", None)
        self.run.define_metric("train/*", step_metric="trainer/step")
        self.run.define_metric(main_metric, step_metric="trainer/step", summary="max" if greater_is_better else "min")
        split = main_metric.split("/")[0]
        self.run.define_metric(f"{split}/*", step_metric="trainer/step")
        self.active = True

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # W&B must never take the training job down
            log.warning(f"W&B {what} failed ({type(exc).__name__}: {exc}); tracking is off for the rest of this run")
            self.active = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._guard("log", self.run.log, {**metrics, "trainer/step": step})

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", self.run.summary.update, values)

    def finish(self, failed: bool = False) -> None:
        if self.active:
            self._guard("finish", self.run.finish, exit_code=1 if failed else 0)
            self.active = False


def make_tracker(logger_cfg: Any, *, config: dict[str, Any], group: str, name: str, tags: list[str], directory: str,
                 main_metric: str, greater_is_better: bool) -> Tracker:
    backend = logger_cfg.backend
    if backend not in LOGGER_BACKENDS:
        raise UnipeltError(f"logger.backend: unknown value '{backend}' (allowed: {allowed(LOGGER_BACKENDS)})")
    if backend == "none":
        return Tracker()
    mode = resolve_mode(logger_cfg.mode)
    if mode == "disabled":
        return Tracker()
    try:
        return WandbTracker(project=logger_cfg.project, entity=logger_cfg.entity, mode=mode,
                            group=logger_cfg.group or group, job_type=logger_cfg.job_type, name=name,
                            tags=list(tags) + list(logger_cfg.tags), config=config,
                            directory=logger_cfg.dir or directory, main_metric=main_metric,
                            greater_is_better=greater_is_better)
    except Exception as exc:
        log.warning(f"W&B could not start ({type(exc).__name__}: {exc}); training goes on without it")
        return Tracker()
