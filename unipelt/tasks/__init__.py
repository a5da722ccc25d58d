"""Tasks: configs (conf/task/*.yaml), data loading from the hub or local files, tokenization, collation and
official metrics. `prepare_task(cfg, tokenizer, model_type=...)` is the entry point for a training loop.

Sits above unipelt's core (it uses only `unipelt.errors`) and below the trainer and the Hydra app."""

from ..errors import DataError
from .config import KINDS, TaskConfig, list_tasks, load_task_config
from .features import IGNORE_INDEX, FeatureDataset, architecture, pad_batch
from .metrics import METRICS, METRICS_BY_KIND, compute_metrics
from .prepared import PreparedTask, prepare_task

__all__ = [
    "DataError",
    "FeatureDataset",
    "IGNORE_INDEX",
    "KINDS",
    "METRICS",
    "METRICS_BY_KIND",
    "PreparedTask",
    "TaskConfig",
    "architecture",
    "compute_metrics",
    "list_tasks",
    "load_task_config",
    "pad_batch",
    "prepare_task",
]
