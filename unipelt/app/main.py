"""unipelt-train: the Hydra app. `unipelt-train [overrides]`, `unipelt-train -m method=lora,mam seed=1,2,3`.

One job: validate the method, task and trainer configs (cheap, before any download), seed, load the tokenizer,
task and model, attach the method (an equal-parameter `method.budget` is solved by unipelt.attach), train with
unipelt.train.fit, and append the job's record, completed or failed with its reason, to the local results file.
W&B gets the resolved config, the parameter counts and the metrics. Data parallel: `torchrun --nproc_per_node=N
-m unipelt.app.main ...` (or `accelerate launch`); rank 0 logs, evaluates and writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .. import attach, compat, count_parameters, load_method
from ..errors import UnipeltError, allowed, one_line
from ..optim import method_of
from ..package_files import conf_dir
from ..spec import MethodSpec
from ..tasks import load_task_config, prepare_task
from ..train import TrainConfig, TrainingInterrupted, distributed, fit, set_seed
from ..train.config import check as check_trainer
from ..train.config import check_max_length
from . import folders
from .ablation import apply_axes, axes_set, cell_name
from .by_method import apply_by_method
from .method_files import method_files
from .results import append_record
from .schema import register
from .tracking import Tracker, make_tracker

log = logging.getLogger("unipelt.train")
# Hydra plugins that installed distributions declare for this app (pyproject.toml: hydra/launcher=gpus,
# hydra/sweeper=ablation). They import the app, so the app names only this group, never their package.
PLUGIN_GROUP = "unipelt.plugins"


def register_plugins() -> None:
    """Registers every class of the entry-point group PLUGIN_GROUP with Hydra. Hydra finds plugins by listing its
    plugin namespace package, which misses a package mapped by an editable install (pip install -e .); an entry
    point is in the metadata of every install, editable or not."""
    plugins = Plugins.instance()  # first: its scan imports what it finds, so no class is then defined twice
    for point in entry_points(group=PLUGIN_GROUP):
        plugin = point.load()
        try:
            plugins.register(plugin)
        except ValueError:  # Hydra's own message does not say which
            raise UnipeltError(f"entry point '{point.name} = {point.value}' ({PLUGIN_GROUP}) is not a Hydra plugin "
                               "class") from None


register()
register_plugins()


@dataclasses.dataclass
class Job:
    output_dir: Path
    results_path: Path
    choices: dict[str, Any]
    overrides: list[str]
    number: int | None


def _job(cfg: DictConfig) -> Job:
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    base = Path(hc.sweep.dir) if multirun else output_dir
    results_path = Path(cfg.results_file)
    results_path = results_path if results_path.is_absolute() else base / results_path
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") or k == "hydra/launcher"}
    return Job(output_dir=output_dir, results_path=results_path, choices=choices,
               overrides=list(hc.overrides.task), number=hc.job.num if multirun else None)


def _one_line(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")[:2000]


def _load_model(cfg: DictConfig, task_cfg: Any, train_cfg: TrainConfig, seed: int,
                spec: MethodSpec | None = None):
    """The task and the model; `spec`: the job's method as validate() made it (None: validated here from cfg), whose
    input tokens the sequence length must leave room for."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    path = cfg.model.name_or_path
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.model.dtype not in dtypes:
        raise UnipeltError(f"model.dtype: unknown value '{cfg.model.dtype}' (allowed: {allowed(dtypes)})")
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:  # not a folder with a config.json, not on the hub, or offline
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnipeltError(f"model.name_or_path '{path}': cannot load its config ({first[:300]})") from None
    model_type = model_config.model_type
    spec = validate(cfg)[0] if spec is None else spec
    check_max_length(train_cfg, model_config, spec.input_tokens(), f"model '{path}'")  # before any data is tokenized
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or path)
    task = prepare_task(task_cfg, tokenizer, model_type=model_type, max_length=train_cfg.max_length,
                        max_train_samples=train_cfg.max_train_samples, max_eval_samples=train_cfg.max_eval_samples,
                        seed=seed)
    if task.train is None:
        raise UnipeltError(f"task '{task.name}' has no training split (splits.train is null)")
    set_seed(seed, train_cfg.deterministic)  # the head's initialisation does not depend on the data size
    kwargs = dict(task.model_kwargs(), dtype=dtypes[cfg.model.dtype], **compat.MODEL_LOAD_KWARGS)
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    model = task.auto_model_class().from_pretrained(path, **kwargs)
    return model, task


def validate(cfg: DictConfig, method: MethodSpec | None = None) -> tuple[MethodSpec, Any, TrainConfig]:
    """The cheap checks: a bad method, task or trainer value fails here, before anything is loaded or written.
    Returns the job's method (by_method applied), task config and trainer config. `method`: the spec apply_axes
    built from cfg's axes; None: cfg's axes are applied, or its method parsed, here."""
    if method is None:
        cfg, method = apply_axes(cfg)
    spec = load_method(cfg.method) if method is None else method
    task_cfg = load_task_config(cfg.task)
    train_cfg = TrainConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    for key, value in (cfg.get("lr_by_method") or {}).items():
        if not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise UnipeltError(f"lr_by_method.{key} must be a positive finite number, got {value!r}")
    own_lr = (cfg.get("lr_by_method") or {}).get(spec.name)
    if own_lr is not None:
        train_cfg = dataclasses.replace(train_cfg, lr=float(own_lr))
    spec, train_cfg = apply_by_method(cfg.get("by_method"), spec, train_cfg)
    check_trainer(train_cfg)
    path = str(cfg.model.name_or_path)
    if path.startswith(("/", "./", "../", "~")) and not Path(os.path.expanduser(path)).exists():
        raise UnipeltError(f"model.name_or_path '{path}' does not exist")
    return spec, task_cfg, train_cfg


def train_job(cfg: DictConfig, job: Job, record: dict[str, Any], trackers: list[Tracker],
              validated: tuple[MethodSpec, Any, TrainConfig]) -> float:
    """One job from validate()'s result: load, attach, train, fill in `record`; returns the score."""
    spec, task_cfg, train_cfg = validated
    info = distributed.setup(train_cfg.device)
    wanted_gpu = os.environ.get("UNIPELT_REQUIRE_GPU")  # set by hydra/launcher=gpus for the job's process
    if wanted_gpu and info.device.type != "cuda":
        raise UnipeltError(f"hydra/launcher=gpus gave this job GPU {wanted_gpu}, but it sees no CUDA device (device "
                           f"'{info.device}'); check hydra.launcher.gpus")
    # every process writes checkpoints into rank 0's folder (torchrun starts each with its own clock)
    output_dir = Path(distributed.broadcast(str(job.output_dir), info))
    seed = int(cfg.seed)
    set_seed(seed, train_cfg.deterministic)
    model, task = _load_model(cfg, task_cfg, train_cfg, seed, spec)
    attach(model, spec)
    attached = method_of(model)
    counts = count_parameters(model)
    record.update(method=attached.name, method_spec=attached.to_dict(), params=counts,
                  main_metric=f"{train_cfg.eval_split or next(iter(task.eval_splits))}/{task.main_metric}",
                  greater_is_better=task.greater_is_better, world_size=info.world_size, lr=train_cfg.lr)
    log.info(f"{attached.name} on {cfg.model.name_or_path}: {counts['added']:,} added parameters "
             f"({counts['percent']:.3f}% of the base), {counts['trainable']:,} trainable")
    if info.is_main:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        tracker = make_tracker(cfg.logger, config={**resolved, "method_solved": attached.to_dict(),
                                                   "choices": job.choices, "run_id": record["run_id"]},
                               group=cfg.name, name=_run_name(record), directory=str(output_dir),
                               tags=[f"method:{attached.name}", f"task:{task.name}", f"seed:{seed}"],
                               main_metric=record["main_metric"], greater_is_better=task.greater_is_better)
        trackers.append(tracker)
        tracker.summary({"params/added": counts["added"], "params/trainable": counts["trainable"],
                         "params/percent": counts["percent"]})
        record["wandb_dir"] = tracker.run_dir
    else:
        tracker = Tracker()
    try:
        result = fit(model, task, train_cfg, output_dir, seed=seed, log=tracker.log, info=info,
                     settings=folders.result_config(cfg))
    finally:
        distributed.teardown(info)
    record.update(status="completed", metrics=result.metrics, score=result.score, best_step=result.best_step,
                  steps=result.steps, train_loss=result.train_loss, stopped_early=result.stopped_early,
                  resumed_from=result.resumed_from)
    tracker.summary({**{f"final/{k}": v for k, v in result.metrics.items()}, "best/step": result.best_step,
                     f"best/{result.main_metric}": result.score})
    if info.is_main:
        width = max(len(k) for k in result.metrics)
        lines = "\n".join(f"  {k:<{width}}  {v:.4f}" for k, v in sorted(result.metrics.items()))
        print(f"final metrics ({attached.name} on {task.name}, best step {result.best_step}/{result.steps}):\n"
              f"{lines}", flush=True)
    return result.score


def _run_name(record: dict[str, Any]) -> str:
    return f"{record['method']}-{record['task']}-seed{record['seed']}"


def _new_record(cfg: DictConfig, job: Job) -> dict[str, Any]:
    choices = job.choices
    record: dict[str, Any] = {
        "status": "failed", "run_id": uuid.uuid4().hex, "config": folders.result_config(cfg), "name": cfg.name,
        "seed": int(cfg.seed), "task": choices.get("task"), "method": choices.get("method"),
        "model": choices.get("model"), "choices": choices,
        "overrides": job.overrides, "job_num": job.number, "output_dir": str(job.output_dir),
        "model_path": cfg.model.name_or_path, "host": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "started": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }
    return record


def _skip(cfg: DictConfig, job: Job, exc: UnipeltError) -> float:
    """An axis combination the grammar refuses: one line in a single run; in a sweep a `skipped` record (listed by
    unipelt-report) and NaN for the sweeper (Optuna counts the trial as failed and samples on)."""
    if job.number is None:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    record = _new_record(cfg, job)
    record.update(status="skipped", reason=_one_line(exc), method=cell_name(axes_set(cfg.axes), str(cfg.method.get(
        "name", "custom"))), finished=datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    log.warning(f"skipped: {record['reason']}")
    if int(os.environ.get("RANK", "0")) == 0:
        append_record(job.results_path, record)
    return math.nan


def run(cfg: DictConfig) -> float:
    """The task function (module-level and undecorated, so launchers can pickle it)."""
    job = _job(cfg)
    try:
        cfg, method = apply_axes(cfg)
    except UnipeltError as exc:
        return _skip(cfg, job, exc)
    validated = None
    if job.number is None:
        # A single run with a bad config: one line and exit status 2, no traceback and no results record. In a
        # sweep the job is recorded as failed instead (below), so that the report shows it and the others run on.
        try:
            validated = validate(cfg, method)
        except UnipeltError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    try:
        folders.check_writable(job.results_path)
    except UnipeltError as exc:  # found now, not after hours of training
        if job.number is None:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise
    record = _new_record(cfg, job)
    trackers: list[Tracker] = []
    start = time.perf_counter()
    try:
        return train_job(cfg, job, record, trackers, validated or validate(cfg, method))
    except (TrainingInterrupted, KeyboardInterrupt) as exc:  # Ctrl-C / SIGTERM: one line, never a traceback
        text = str(exc) if isinstance(exc, TrainingInterrupted) else "interrupted before training started"
        record.update(status="interrupted", reason=f"{type(exc).__name__}: {text}")
        print(f"interrupted: {text}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BaseException as exc:
        record.update(status="failed", reason=_one_line(exc))
        log.error(f"job failed: {record['reason']}")
        if job.number is None and isinstance(exc, UnipeltError):  # e.g. a data error: one line, not a traceback
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise
    finally:
        record["time_s"] = round(time.perf_counter() - start, 3)
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        if int(os.environ.get("RANK", "0")) == 0:
            append_record(job.results_path, record)
        for tracker in trackers:
            tracker.finish(failed=record["status"] != "completed")


_hydra_main = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")(run)


def main() -> Any:
    """unipelt-train; `method=<file.yaml>` takes a method file (e.g. design_search's best_method.yaml) as it is."""
    sys.argv[1:] = method_files(sys.argv[1:])
    return _hydra_main()

if __name__ == "__main__":
    sys.exit(main())
