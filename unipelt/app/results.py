"""The local results file: one JSON line per finished job (completed or failed), appended atomically.

Many jobs of a sweep may finish at once (the gpus launcher runs them in parallel processes), so an append takes
an exclusive lock, writes the whole file plus the new line to a temporary name and renames it over the old one:
a reader never sees half a line, and a crash never leaves a truncated file.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import UnipeltError, read_utf8
from ..io import atomic_write

RESULTS_NAME = "results.jsonl"


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = path.read_text(encoding="utf-8") if path.exists() else ""
            if old and not old.endswith("\n"):
                old += "\n"
            atomic_write(path, lambda tmp: tmp.write_text(old + line, encoding="utf-8"))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def result_files(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Results files named directly, or found (recursively) under the directories named."""
    files: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            files += sorted(source.rglob(RESULTS_NAME))
        elif source.is_file():
            files.append(source)
        else:
            raise UnipeltError(f"results: {source} is neither a results file nor a directory")
    unique: dict[str, Path] = {}
    for path in files:  # one file reached through two paths (a symlink, overlapping folders) is read once
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def read_records(sources: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    records = []
    for path in result_files(sources):
        text = read_utf8(path, UnipeltError, "results")
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UnipeltError(f"results: {path}:{number} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UnipeltError(f"results: {path}:{number} is not a JSON object")
            record.setdefault("source", str(path))
            records.append(record)
    return records
