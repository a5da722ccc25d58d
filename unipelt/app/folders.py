"""Run folders in the Hydra app: one run (or sweep) per folder, checked before Hydra writes anything into it.

`RunFolderGuard` is a Hydra callback (conf/train.yaml, hydra.callbacks). At the start of a single run it takes the
run folder's lock (a second run in the same folder stops with one line), then checks what the folder holds: a
fresh run over another run's checkpoint, a resume with no checkpoint, and a resume whose composed config differs
from the folder's `.hydra/config.yaml` in anything that changes the result are refused, naming the key, before
Hydra overwrites that record. A sweep locks its sweep folder the same way; each job's folder is then locked and
checked by the trainer (unipelt.train.fit), which also compares the resumed checkpoint's own settings. Hydra writes
a sweep job's `.hydra/` before any callback sees the job, so a resumed sweep first copies every job's record aside
(`.hydra.before_resume/`) and, when a job's composed config changes its result, puts the old record back before the
trainer refuses the job: the folder keeps describing the run its checkpoint holds.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..errors import UnipeltError
from ..train import runfolder
from ..train.checkpoint import CHECKPOINT_DIR, LAST
from ..train.sharding import SHARDED_CHECKPOINT

# Config keys that do not change what a run computes (logging, naming, where results go, trainer conveniences).
IGNORED_PREFIXES = ("hydra.", "logger.", "name", "results_file", "method_solved.", "choices.", "run_id")
RESULTS_NAME = "results.jsonl"
RECORD, RECORD_BACKUP = ".hydra", ".hydra.before_resume"


def _ignored(key: str) -> bool:
    if key.startswith("trainer.") and key.split(".", 1)[1] in runfolder.RESUMABLE_KEYS:
        return True
    return any(key == p or key.startswith(p) for p in IGNORED_PREFIXES)


def result_config(cfg: Any, resolve: bool = True) -> dict[str, Any]:
    """The composed config, flat (`trainer.lr`, `method.modules.0.dim`), without the keys that do not change the
    result: what a resumed run must keep, and what the report groups runs by."""
    container = OmegaConf.to_container(cfg, resolve=resolve) if isinstance(cfg, DictConfig) else dict(cfg)
    container.pop("hydra", None)
    return {k: v for k, v in runfolder.flatten(container).items() if not _ignored(k)}


def check_writable(path: Path) -> None:
    """The results file (and its lock beside it) can be written: found before training, not after it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as exc:
        raise UnipeltError(f"results_file {path} cannot be written ({exc.strerror or exc}); "
                           "set results_file to a writable path") from None


def _stop(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_run_folder(folder: Path, cfg: DictConfig) -> None:
    """Refuse (UnipeltError) what would mix two runs' files in one folder; see the module docstring."""
    resume = bool(OmegaConf.select(cfg, "trainer.resume", default=False))
    # a sharded run (trainer.strategy=fsdp over several processes) checkpoints into a torch.distributed.checkpoint
    # directory instead of last.pt
    sharded = OmegaConf.select(cfg, "trainer.strategy", default="ddp") == "fsdp" and \
        int(os.environ.get("WORLD_SIZE", "1")) > 1
    checkpoint = folder / CHECKPOINT_DIR / (SHARDED_CHECKPOINT if sharded else LAST)
    if resume and not checkpoint.exists():
        raise UnipeltError(f"trainer.resume=true but {checkpoint} does not exist; set trainer.resume=false to start "
                           "afresh")
    if not resume:
        taken = [name for name in (f"{CHECKPOINT_DIR}/{LAST}", f"{CHECKPOINT_DIR}/{SHARDED_CHECKPOINT}",
                                   RESULTS_NAME, "best_adapter")
                 if (folder / name).exists()]
        if taken:
            raise UnipeltError(f"run folder {folder} already holds another run ({taken[0]}); continue it with "
                               "trainer.resume=true, or choose another hydra.run.dir")
        return
    saved = folder / ".hydra" / "config.yaml"
    if saved.is_file():
        before = result_config(OmegaConf.load(saved), resolve=False)
        now = result_config(cfg, resolve=False)
        runfolder.refuse_changed_settings(before, now, str(saved))


def check_sweep_folder(folder: Path, cfg: DictConfig) -> None:
    """A fresh sweep never writes into a sweep folder that holds results (job folders 0, 1, ... would mix)."""
    if (folder / RESULTS_NAME).exists() and not OmegaConf.select(cfg, "trainer.resume", default=False):
        raise UnipeltError(f"sweep folder {folder} already holds results ({RESULTS_NAME}); resume its jobs with "
                           "trainer.resume=true, or choose another hydra.sweep.dir")


def keep_job_records(sweep: Path) -> None:
    """Before a resumed sweep: copy each job folder's Hydra record aside (see the module docstring)."""
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()) if sweep.is_dir() else []:
        if (job / RECORD / "config.yaml").is_file() and not (job / RECORD_BACKUP).exists():
            shutil.copytree(job / RECORD, job / RECORD_BACKUP)


def restore_changed_record(job: Path, cfg: DictConfig) -> None:
    """At a resumed sweep job's start: the old record back if the job's result-changing config differs from it (the
    trainer then refuses the job, naming the key); the copy dropped otherwise."""
    backup = job / RECORD_BACKUP
    if not (backup / "config.yaml").is_file():
        return
    if result_config(OmegaConf.load(backup / "config.yaml"), resolve=False) != result_config(cfg, resolve=False):
        shutil.rmtree(job / RECORD, ignore_errors=True)
        os.replace(backup, job / RECORD)
    else:
        shutil.rmtree(backup)


def _task_config(config: DictConfig) -> DictConfig:
    """The job's config without Hydra's own node (what the job and its record see)."""
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


class RunFolderGuard(Callback):
    """Hydra callback: lock and check the run / sweep folder before Hydra writes into it."""

    def __init__(self) -> None:
        self.key: str | None = None

    @staticmethod
    def _main_process() -> bool:
        return int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 owns the folder

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._main_process():
            return
        HydraConfig.instance().set_config(config)
        folder = Path(str(config.hydra.run.dir)).absolute()
        try:
            self.key = runfolder.lock_folder(folder, "run")
            check_run_folder(folder, _task_config(config))
        except UnipeltError as exc:
            _stop(str(exc))

    def on_run_end(self, **kwargs: Any) -> None:
        if self.key is not None:
            runfolder.unlock_folder(self.key)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._main_process():
            return
        HydraConfig.instance().set_config(config)
        folder = Path(str(config.hydra.sweep.dir)).absolute()
        try:
            self.key = runfolder.lock_folder(folder, "sweep")
            check_sweep_folder(folder, config)
        except UnipeltError as exc:
            _stop(str(exc))
        if OmegaConf.select(config, "trainer.resume", default=False):
            keep_job_records(folder)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._main_process() or OmegaConf.select(config, "hydra.mode", default=None) != RunMode.MULTIRUN:
            return
        restore_changed_record(Path(str(config.hydra.runtime.output_dir)), _task_config(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._main_process():  # the jobs of this sweep took their copies; a job it did not run left its own
            sweep = Path(str(config.hydra.sweep.dir)).absolute()
            for backup in sweep.glob(f"*/{RECORD_BACKUP}") if sweep.is_dir() else []:
                shutil.rmtree(backup, ignore_errors=True)
        self.on_run_end()


__all__ = ["RunFolderGuard", "check_run_folder", "check_sweep_folder", "check_writable", "keep_job_records",
           "restore_changed_record", "result_config"]
