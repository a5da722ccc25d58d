"""Task configs: the schema of one `conf/task/*.yaml`, and loading/validating it from a name, path, dict or
DictConfig. Everything here is checked before any data is read: unknown keys, kinds and metrics, a main metric
that is not computed, splits of the wrong shape, all raise DataError with one line naming the culprit."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import DataError, allowed, read_utf8
from ..package_files import conf_dir
from ..spec_values import load_yaml
from .metrics import METRICS_BY_KIND, SENTENCE_SPLITS

QUOTINGS = ("csv", "none")  # of local TSV / CSV files (unipelt.tasks.files reads them)
KINDS = ("classification", "regression", "tagging", "summarization", "translation")
GENERATION_KINDS = ("summarization", "translation")


@dataclass(frozen=True)
class TaskConfig:
    """One task. Field types stay within what OmegaConf structured configs accept (Hydra's `task` schema)."""

    name: str
    kind: str  # classification | regression | tagging | summarization | translation
    hub: str | None = None  # dataset id on the Hugging Face hub, e.g. "nyu-mll/glue"
    hub_subset: str | None = None  # its configuration, e.g. "sst2"
    data_dir: str | None = None  # local folder with <split>.{tsv,csv,jsonl,conll}; when set the hub is not used
    # split names: "train" (or null for an evaluation-only task) and "eval" (one name or a list of names)
    splits: dict = field(default_factory=lambda: {"train": "train", "eval": ["validation"]})
    files: dict | None = None  # split -> file name (relative to data_dir) or path, overriding <split>.<ext>
    # TSV / CSV quoting: "csv" ("..." around a field holding a delimiter, quote or line break; inner quotes doubled:
    # Python's csv module, pandas, the files in ../shared/data) or "none" (quotes are text: the official GLUE files)
    quoting: str = "csv"
    # classification/regression: one or two text columns (a sentence pair); tagging: the word-list column;
    # generation: [source, target]
    text_columns: list[str] = field(default_factory=list)
    label_column: str | None = None  # classification/regression label, or the per-word tag list for tagging
    label_names: list[str] | None = None  # the label set (classification, tagging), in index order
    metrics: list[str] = field(default_factory=list)
    main_metric: str = ""  # empty: the first of `metrics`
    # generation
    translation_column: str | None = None  # a column of {lang: text} dicts (WMT on the hub), flattened first
    source_prefix: str = ""  # prepended to every source, e.g. T5's "summarize: "
    answer_prefix: str = ""  # decoder-only models: text between the source and the target, e.g. "\nTL;DR:"
    max_target_length: int = 128  # target tokens kept for training; default generation budget
    # generation at evaluation (model.generate): beam width, new-token bounds (HF's min/max_length minus the decoder
    # start token on encoder-decoders), length penalty (beam scores / length**penalty), no repeated n-grams (0: off)
    num_beams: int = 1
    max_new_tokens: int | None = None  # None: max_target_length
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # language codes for multilingual tokenizers (mBART: en_XX, ro_RO); tokenizers without codes ignore them
    source_lang: str | None = None
    target_lang: str | None = None
    sentence_split: str = "punkt_untrained"  # how rougeLsum finds sentences: punkt | punkt_untrained | none


FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig))
SPLIT_KEYS = ("train", "eval")


def task_dir() -> Path:
    return conf_dir() / "task"


def list_tasks() -> list[str]:
    """Names of the task configs shipped in conf/task/."""
    return sorted(p.stem for p in task_dir().glob("*.yaml"))


def load_task_config(source: Any) -> TaskConfig:
    """Read a task from a shipped task name, a YAML path, a dict, an OmegaConf DictConfig or a TaskConfig."""
    if isinstance(source, TaskConfig):
        return _validate(source)
    if isinstance(source, (str, Path)):
        path = _resolve_yaml(source)
        try:
            raw = load_yaml(read_utf8(path, DataError, "task file"))
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "parse error"
            raise DataError(f"task file {path}: invalid YAML ({first})") from None
        if not isinstance(raw, Mapping):
            raise DataError(f"task file {path}: expected a mapping at the top level")
        raw = dict(raw)
        raw.setdefault("name", path.stem)
        return _from_mapping(raw, f"task file {path}")
    raw = _to_container(source)
    if not isinstance(raw, Mapping):
        raise DataError(f"task: expected a task name, YAML path, dict or DictConfig, got {type(source).__name__}")
    return _from_mapping(dict(raw), "task")


def _resolve_yaml(source: str | Path) -> Path:
    text = str(source)
    if isinstance(source, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise DataError(f"task file not found: {path}")
        return path
    path = task_dir() / f"{text}.yaml"
    if not path.is_file():
        raise DataError(f"unknown task '{text}' (allowed: {allowed(list_tasks())})")
    return path


def _to_container(source: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(source, DictConfig):
        return OmegaConf.to_container(source, resolve=True)
    return source


def _from_mapping(raw: dict[str, Any], where: str) -> TaskConfig:
    raw.pop("_target_", None)
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown key '{unknown[0]}' (allowed: {allowed(FIELDS)})")
    for key in ("name", "kind"):
        if key not in raw:
            raise DataError(f"{where}: missing key '{key}'")
    return _validate(TaskConfig(**raw))


def _validate(cfg: TaskConfig) -> TaskConfig:
    """Check every field and return a normalised copy (eval splits as a list, main_metric filled in)."""
    if not isinstance(cfg.name, str) or not cfg.name:
        raise DataError(f"task: name must be a non-empty string, got {cfg.name!r}")
    where = f"task '{cfg.name}'"
    if cfg.kind not in KINDS:
        raise DataError(f"{where}: unknown kind {cfg.kind!r} (allowed: {allowed(KINDS)})")
    for key in ("hub", "hub_subset", "data_dir", "label_column", "translation_column", "source_lang", "target_lang"):
        value = getattr(cfg, key)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: {key} must be a string or null, got {value!r}")
    if cfg.quoting not in QUOTINGS:
        raise DataError(f"{where}: quoting: unknown value {cfg.quoting!r} (allowed: {allowed(QUOTINGS)})")
    if cfg.hub is None and cfg.data_dir is None:
        raise DataError(f"{where}: set 'hub' (a hub dataset id) or 'data_dir' (a local folder)")
    splits = _splits(cfg.splits, where)
    files = _files(cfg.files, splits, where)
    text_columns = _string_list(cfg.text_columns, f"{where}: text_columns")
    expected = {"classification": (1, 2), "regression": (1, 2), "tagging": (1,), "summarization": (2,),
                "translation": (2,)}[cfg.kind]
    if len(text_columns) not in expected:
        meaning = {1: "one column", 2: "two columns"}
        raise DataError(
            f"{where}: kind '{cfg.kind}' needs {' or '.join(meaning[n] for n in expected)} in text_columns "
            f"({'source, target' if cfg.kind in GENERATION_KINDS else 'text'}), got {text_columns}"
        )
    needs_label = cfg.kind in ("classification", "regression", "tagging")
    if needs_label and not cfg.label_column:
        raise DataError(f"{where}: kind '{cfg.kind}' needs 'label_column'")
    label_names = cfg.label_names
    if isinstance(label_names, (list, tuple)):  # YAML reads labels such as 1..5 as integers; names are text
        label_names = [str(n) if isinstance(n, int) and not isinstance(n, bool) else n for n in label_names]
    label_names = None if label_names is None else _string_list(label_names, f"{where}: label_names")
    if cfg.kind in ("classification", "tagging"):
        if not label_names or len(label_names) < 2:
            raise DataError(f"{where}: kind '{cfg.kind}' needs 'label_names' with at least two labels")
        if len(set(label_names)) != len(label_names):
            raise DataError(f"{where}: label_names has duplicates: {label_names}")
    elif label_names is not None:
        raise DataError(f"{where}: 'label_names' only applies to classification and tagging, not '{cfg.kind}'")
    metrics = _string_list(cfg.metrics, f"{where}: metrics")
    if not metrics:
        raise DataError(f"{where}: 'metrics' is empty (allowed for {cfg.kind}: {allowed(METRICS_BY_KIND[cfg.kind])})")
    for metric in metrics:
        if metric not in METRICS_BY_KIND[cfg.kind]:
            raise DataError(
                f"{where}: unknown metric '{metric}' for kind '{cfg.kind}' "
                f"(allowed: {allowed(METRICS_BY_KIND[cfg.kind])})"
            )
    if "f1" in metrics and label_names is not None and len(label_names) != 2:
        raise DataError(f"{where}: metric 'f1' is binary (positive label index 1); use 'f1_macro' "
                        f"for {len(label_names)} labels")
    main_metric = cfg.main_metric or metrics[0]
    if main_metric not in metrics:
        raise DataError(f"{where}: main_metric '{main_metric}' is not in metrics ({allowed(metrics)})")
    for key in ("source_prefix", "answer_prefix"):
        if not isinstance(getattr(cfg, key), str):
            raise DataError(f"{where}: {key} must be a string, got {getattr(cfg, key)!r}")
    _check_generation(cfg, where)
    return dataclasses.replace(
        cfg, splits=splits, files=files, text_columns=text_columns, label_names=label_names, metrics=metrics,
        main_metric=main_metric,
    )


def _check_generation(cfg: TaskConfig, where: str) -> None:
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key in ("max_target_length", "num_beams"):
        value = getattr(cfg, key)
        if not integer(value) or value <= 0:
            raise DataError(f"{where}: {key} must be a positive integer, got {value!r}")
    if cfg.max_new_tokens is not None and (not integer(cfg.max_new_tokens) or cfg.max_new_tokens <= 0):
        raise DataError(f"{where}: max_new_tokens must be a positive integer or null, got {cfg.max_new_tokens!r}")
    for key in ("min_new_tokens", "no_repeat_ngram_size"):
        value = getattr(cfg, key)
        if not integer(value) or value < 0:
            raise DataError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    budget = cfg.max_new_tokens or cfg.max_target_length
    if cfg.min_new_tokens > budget:
        raise DataError(f"{where}: min_new_tokens {cfg.min_new_tokens} exceeds the generation budget {budget}")
    penalty = cfg.length_penalty
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
        raise DataError(f"{where}: length_penalty must be a finite number, got {penalty!r}")
    if (cfg.source_lang is None) != (cfg.target_lang is None):
        raise DataError(f"{where}: set both source_lang and target_lang (language codes) or neither")
    if cfg.sentence_split not in SENTENCE_SPLITS:
        raise DataError(f"{where}: unknown sentence_split {cfg.sentence_split!r} (allowed: {allowed(SENTENCE_SPLITS)})")


def _splits(value: Any, where: str) -> dict[str, Any]:
    value = _to_container(value)
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: splits must be a mapping with keys {allowed(SPLIT_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(SPLIT_KEYS))
    if unknown:
        raise DataError(f"{where}: splits: unknown key '{unknown[0]}' (allowed: {allowed(SPLIT_KEYS)})")
    train = value.get("train")
    if train is not None and (not isinstance(train, str) or not train):
        raise DataError(f"{where}: splits.train must be a split name or null, got {train!r}")
    evals = value.get("eval", [])
    evals = [evals] if isinstance(evals, str) else evals
    evals = _string_list(evals, f"{where}: splits.eval")
    if len(set(evals)) != len(evals):
        raise DataError(f"{where}: splits.eval names a split twice: {evals}")
    if train is None and not evals:
        raise DataError(f"{where}: splits names neither a train nor an eval split")
    return {"train": train, "eval": evals}


def _files(value: Any, splits: dict[str, Any], where: str) -> dict[str, str] | None:
    value = _to_container(value)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: files must map split names to file names, got {value!r}")
    known = [s for s in [splits["train"], *splits["eval"]] if s]
    for split, name in value.items():
        if split not in known:
            raise DataError(f"{where}: files: '{split}' is not one of the task's splits ({allowed(known)})")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: files.{split} must be a file name, got {name!r}")
    return dict(value)


def _string_list(value: Any, where: str) -> list[str]:
    value = _to_container(value)
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: expected a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise DataError(f"{where}: expected a list of non-empty strings, got item {item!r}")
    return list(value)
