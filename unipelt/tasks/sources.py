"""Reading one split of a task into plain column lists, from the hub or from local files, and checking it:
the file exists, is not empty, has the configured columns, and every label is in the task's label set.

Local files are `<data_dir>/<split>.<ext>` (or `files: {split: name}`), read through `datasets`: .tsv and .csv
with a header row (every cell read as text, so "NA" or "null" stay words), .jsonl / .json (one object per
line; list columns for tagging, a {lang: text} column for translation), and .conll for tagging (one word per
line, the tag in the last column, a blank line between sentences, -DOCSTART- lines skipped)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError, allowed, read_utf8
from .config import GENERATION_KINDS, TaskConfig
from .files import read_delimited, read_json_rows

EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json", ".conll")


@dataclass
class RawSplit:
    """The columns a task needs, as Python lists, with where they came from (for error messages)."""

    split: str
    origin: str  # a file path, or "hub <id> (<subset>) split <name>"
    texts: list[list[Any]]  # one list per text column: strings, or word lists for tagging
    labels: list[Any] | None  # class indices, floats, or per-word tag indices
    row_name: Callable[[int], str]

    def __len__(self) -> int:
        return len(self.texts[0])


def load_split(cfg: TaskConfig, split: str) -> RawSplit:
    """Load and check one split; raises DataError naming the file (or hub split), row and column at fault."""
    if cfg.data_dir is not None:
        path = _local_path(cfg, split)
        table, row_name = _read_local(path, cfg, split)
        origin = str(path)
    else:
        table, origin = _read_hub(cfg, split)
        row_name = lambda i: f"row {i}"  # noqa: E731 - the hub has no lines; rows count from 0 as in datasets
    where = f"task '{cfg.name}'"
    found = list(table.column_names) if hasattr(table, "column_names") else list(table)
    needed = list(cfg.text_columns) + ([cfg.label_column] if cfg.label_column else [])
    # only the columns the task reads are copied out of the (memory-mapped) table
    wanted = [c for c in found if c in needed or c == cfg.translation_column]
    if isinstance(table, dict):
        columns = {c: table[c] for c in wanted if c in table}
    else:  # a datasets.Dataset: one columnar read, not a Python loop over rows
        columns = dict(table.select_columns(wanted)[:]) if wanted else {}
    columns = _flatten_translation(cfg, columns, origin, row_name, where)
    for column in needed:
        if column not in columns:
            raise DataError(f"{where}: column '{column}' not found in {origin} (columns: {allowed(found)})")
    size = len(columns[needed[0]])
    if size == 0:
        raise DataError(f"{where}: split '{split}' in {origin} is empty (no data rows)")
    texts = [_texts(cfg, columns[c], c, origin, row_name, where) for c in cfg.text_columns]
    labels = None
    if cfg.label_column:
        labels = _labels(cfg, columns[cfg.label_column], texts[0], origin, row_name, where)
    return RawSplit(split=split, origin=origin, texts=texts, labels=labels, row_name=row_name)


def _local_path(cfg: TaskConfig, split: str) -> Path:
    where = f"task '{cfg.name}'"
    folder = Path(os.path.expanduser(cfg.data_dir))
    named = (cfg.files or {}).get(split)
    if named is not None:
        path = Path(os.path.expanduser(named))
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise DataError(f"{where}: data file for split '{split}' not found: {path}")
        return path
    if not folder.is_dir():
        raise DataError(f"{where}: data_dir {folder} (split '{split}') does not exist")
    candidates = [folder / f"{split}{ext}" for ext in EXTENSIONS]
    present = [p for p in candidates if p.is_file()]
    if not present:
        raise DataError(
            f"{where}: no data file for split '{split}' in {folder} "
            f"(looked for {', '.join(p.name for p in candidates)}; or name it in task.files)"
        )
    if len(present) > 1:
        raise DataError(f"{where}: split '{split}' has several files in {folder} "
                        f"({', '.join(p.name for p in present)}); name one in task.files")
    return present[0]


def _read_local(path: Path, cfg: TaskConfig, split: str) -> tuple[Any, Callable[[int], str]]:
    """The file's columns (only those the task reads, as lists) and how to name its rows."""
    where = f"task '{cfg.name}'"
    with open(path, "rb") as handle:
        blank = not handle.read(1 << 16).lstrip(b"\xef\xbb\xbf").strip()
    if blank:
        raise DataError(f"{where}: split '{split}' file {path} is empty")
    suffix = path.suffix.lower()
    if suffix == ".conll":
        return _read_conll(path, cfg)
    wanted = set(cfg.text_columns) | {cfg.label_column, cfg.translation_column}
    if suffix in (".tsv", ".csv"):
        # every cell as text: labels are parsed below, and words such as "NA" must not become missing values
        header, columns, row_name = read_delimited(path, where, "\t" if suffix == ".tsv" else ",", cfg.quoting,
                                                   wanted.__contains__)
        return _Table(header, columns), row_name
    if suffix in (".jsonl", ".json"):
        keys, columns, row_name = read_json_rows(path, where)
        if not keys:
            raise DataError(f"{where}: split '{split}' in {path} is empty (no data rows)")
        return _Table(keys, {k: v for k, v in columns.items() if k in wanted}), row_name
    raise DataError(f"{where}: unsupported data file type '{suffix}' for {path} (allowed: {allowed(EXTENSIONS)})")


class _Table(dict):
    """Columns read from a local file, with every column name the file has (for error messages)."""

    def __init__(self, names: list[str], columns: dict[str, list]):
        super().__init__(columns)
        self.column_names = names


def _read_conll(path: Path, cfg: TaskConfig) -> tuple[dict[str, list], Callable[[int], str]]:
    """CoNLL-2003 style: `word ... tag` per line, sentences separated by blank lines."""
    words_column, tags_column = cfg.text_columns[0], cfg.label_column or "tags"
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    starts: list[int] = []
    words: list[str] = []
    labels: list[str] = []
    text = read_utf8(path, DataError, f"task '{cfg.name}'")
    for number, line in enumerate(text.split("\n"), start=1):
        parts = line.split()
        if parts and parts[0] == "-DOCSTART-":
            continue
        if not parts:
            if words:
                sentences.append(words), tags.append(labels)
            words, labels = [], []
            continue
        if len(parts) < 2:
            raise DataError(f"task '{cfg.name}': line {number} of {path} has a word but no tag: {line.strip()!r}")
        if not words:
            starts.append(number)
        words.append(parts[0])
        labels.append(parts[-1])
    if words:
        sentences.append(words), tags.append(labels)
    return {words_column: sentences, tags_column: tags}, lambda i: f"sentence {i + 1} (line {starts[i]})"


def _read_hub(cfg: TaskConfig, split: str) -> tuple[Any, str]:
    import datasets

    origin = f"hub {cfg.hub}" + (f" ({cfg.hub_subset})" if cfg.hub_subset else "") + f" split '{split}'"
    try:
        data = datasets.load_dataset(cfg.hub, cfg.hub_subset, split=split)
    except Exception as exc:  # network, unknown id or split: one line with the library's reason
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"task '{cfg.name}': cannot load {origin} ({type(exc).__name__}: {first}); "
                        f"for local files set task.data_dir") from None
    _check_class_names(cfg, data, origin)
    return data, origin


def _check_class_names(cfg: TaskConfig, data: Any, origin: str) -> None:
    """Hub labels are stored as indices of a ClassLabel; the task's label_names must list the same classes in
    the same order, or every index would silently mean another class."""
    import datasets

    feature = data.features.get(cfg.label_column) if cfg.label_column else None
    if not isinstance(feature, datasets.ClassLabel) and hasattr(feature, "feature"):  # tagging: a list of them
        feature = feature.feature
    if isinstance(feature, datasets.ClassLabel) and cfg.label_names is not None and \
            list(feature.names) != list(cfg.label_names):
        raise DataError(f"task '{cfg.name}': label_names {cfg.label_names} differ from the classes of column "
                        f"'{cfg.label_column}' in {origin} ({feature.names}); list them in the hub's order")


def _flatten_translation(cfg: TaskConfig, columns: dict[str, list], origin: str, row_name, where: str
                         ) -> dict[str, list]:
    """WMT on the hub stores {'en': ..., 'ro': ...} dicts in one column; lift the languages into columns."""
    name = cfg.translation_column
    if name is None or name not in columns or all(c in columns for c in cfg.text_columns):
        return columns
    out = dict(columns)
    for language in cfg.text_columns:
        values = []
        for i, pair in enumerate(columns[name]):
            if not isinstance(pair, dict) or language not in pair:
                raise DataError(f"{where}: column '{name}' at {row_name(i)} of {origin} has no '{language}' "
                                f"text: {pair!r}")
            values.append(pair[language])
        out[language] = values
    return out


def _texts(cfg: TaskConfig, values: list, column: str, origin: str, row_name, where: str) -> list:
    if cfg.kind == "tagging":
        words = []
        for i, value in enumerate(values):
            value = value.split() if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
                raise DataError(f"{where}: column '{column}' at {row_name(i)} of {origin} must be a list of "
                                f"words (or space-separated words), got {value!r}")
            words.append(value)
        return words
    for i, value in enumerate(values):
        if value is None:
            raise DataError(f"{where}: column '{column}' is missing a value at {row_name(i)} of {origin}")
        if not isinstance(value, (str, int)) or isinstance(value, bool):  # a dict, list or NaN is no text
            raise DataError(f"{where}: column '{column}' at {row_name(i)} of {origin} must be text, got {value!r}")
    return [v if isinstance(v, str) else str(v) for v in values]


def _labels(cfg: TaskConfig, values: list, words: list, origin: str, row_name, where: str) -> list:
    column = cfg.label_column
    if cfg.kind == "regression":
        out = []
        for i, value in enumerate(values):
            try:
                if isinstance(value, bool):
                    raise ValueError
                number = float(value)
            except (TypeError, ValueError):
                raise DataError(f"{where}: label {value!r} in column '{column}' at {row_name(i)} of {origin} "
                                f"is not a number (regression)") from None
            if not math.isfinite(number):
                raise DataError(f"{where}: label {value!r} in column '{column}' at {row_name(i)} of {origin} "
                                f"is not a finite number (regression)")
            out.append(number)
        return out
    if cfg.kind in GENERATION_KINDS:
        return list(values)
    encode = label_encoder(cfg.label_names)
    allowed_text = f"allowed: {allowed(cfg.label_names)}"
    if not _numeric_names(cfg.label_names):
        allowed_text += f", or indices 0-{len(cfg.label_names) - 1}"

    def one(value: Any, i: int) -> int:
        index = encode(value)
        if index is None:
            raise DataError(f"{where}: label {value!r} in column '{column}' at {row_name(i)} of {origin} is not "
                            f"in the task's label set ({allowed_text})")
        return index

    if cfg.kind == "classification":
        return [one(value, i) for i, value in enumerate(values)]
    out = []
    for i, value in enumerate(values):
        value = value.split() if isinstance(value, str) else value
        if not isinstance(value, list):
            raise DataError(f"{where}: column '{column}' at {row_name(i)} of {origin} must be a list of tags, "
                            f"got {value!r}")
        if len(value) != len(words[i]):
            raise DataError(f"{where}: {row_name(i)} of {origin} has {len(words[i])} words but {len(value)} tags")
        out.append([one(tag, i) for tag in value])
    return out


def _numeric_names(names: list[str]) -> bool:
    return any(name.lstrip("-").isdigit() for name in names)


def label_encoder(names: list[str]) -> Callable[[Any], int | None]:
    """Map a label value to its index: by its text among `names` first; an integer (or integer text) is read
    as an index only when no name looks like an integer, so labels "1".."5" are never confused with indices."""
    index = {name: i for i, name in enumerate(names)}
    indices_allowed = not _numeric_names(names)

    def encode(value: Any) -> int | None:
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value).strip()
        if text in index:
            return index[text]
        if indices_allowed and text.lstrip("-").isdigit():
            number = int(text)
            if 0 <= number < len(names):
                return number
        return None

    return encode
