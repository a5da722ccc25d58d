"""Reading local data files into columns, unambiguously: every row is checked against the header, and every line
is accounted for, so a file is either read as its writer meant or refused with one line naming the file, the
first line at fault and what to try instead.

TSV / CSV come in two quotings (`task.quoting`): `csv`, as Python's csv writer and pandas write them (a field
holding the delimiter, a quote or a line break is put in "...", inner quotes doubled), and `none`, as the
official GLUE files are written (a quote is an ordinary character; no field holds a tab or a line break). Read
the wrong way, a file changes in silence: a `"` at the start of an unquoted sentence swallows the following tabs
and lines up to the next quote, and a CSV-quoted field keeps its doubled quotes. So under `csv` a quoted field
must close right before a delimiter or the end of the line (Python's strict mode) and a TSV record must sit on
one line; under `none` every line must split into the header's fields and a field that looks CSV-quoted ("...""...")
is refused. JSON lines: one object per line (a .json file may also hold one list of objects).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DataError, allowed, read_utf8
from .config import QUOTINGS

OTHER = {"csv": "none", "none": "csv"}
HINT = {"csv": "as the official GLUE files are", "none": "as Python's csv module and pandas write them"}
FIELD_LIMIT = 2**31 - 1  # no cap on a field's length (the csv module's default is 131,072 characters)

Columns = dict[str, list[Any]]


def _lines(text: str) -> list[str]:
    """Physical lines ("\\n" or "\\r\\n"); unlike str.splitlines, never split inside a text at \\x0b, \\x85 or
    U+2028."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


@contextlib.contextmanager
def _no_field_limit() -> Iterator[None]:
    previous = csv.field_size_limit(FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_delimited(path: Path, where: str, delimiter: str, quoting: str, wanted: Callable[[str], bool]
                   ) -> tuple[list[str], Columns, Callable[[int], str]]:
    """(header, the wanted columns, row -> 'line N') of a TSV / CSV file with a header row."""
    if quoting not in QUOTINGS:
        raise DataError(f"{where}: quoting: unknown value '{quoting}' (allowed: {allowed(QUOTINGS)})")
    text = read_utf8(path, DataError, where)
    kind = "TSV" if delimiter == "\t" else "CSV"

    def refuse(line: int, problem: str) -> DataError:
        other = OTHER[quoting]
        return DataError(f"{where}: line {line} of {path} {problem} when read as {kind} with task.quoting={quoting}; "
                         f"if the file is written with quoting '{other}' ({HINT[quoting]}), set task.quoting={other}")

    records: list[tuple[int, list[str]]] = []  # (first line, fields)
    if quoting == "none":
        for number, line in enumerate(_lines(text), start=1):
            if line.strip():
                records.append((number, line.split(delimiter)))
    else:
        with _no_field_limit():
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
            previous = 0
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    start = previous + 1
                    if reader.line_num > start:
                        raise refuse(start, f"starts a quoted field that runs over lines {start}-{reader.line_num} "
                                            f"({exc})") from None
                    raise refuse(start, f"has a malformed quoted field ({exc})") from None
                if reader.line_num - previous > 1 and delimiter == "\t":
                    raise refuse(previous + 1, f"starts a quoted field that runs over lines {previous + 1}-"
                                               f"{reader.line_num}")
                if fields:
                    records.append((previous + 1, fields))
                previous = reader.line_num
    if not records:
        raise DataError(f"{where}: {path} is empty")
    header = records[0][1]
    if len(set(header)) != len(header):
        raise DataError(f"{where}: {path} has a repeated column name in its header ({allowed(header)})")
    for line, fields in records[1:]:
        if len(fields) != len(header):
            raise refuse(line, f"has {len(fields)} fields, the header {len(header)} ({allowed(header)})")
        if quoting == "none":
            quoted = next((f for f in fields if len(f) > 2 and f[0] == f[-1] == '"' and '""' in f[1:-1]), None)
            if quoted is not None:
                raise refuse(line, f"has a field that looks CSV-quoted ({quoted[:40]!r})")
    keep = [i for i, name in enumerate(header) if wanted(name)]
    columns: Columns = {header[i]: [fields[i] for _, fields in records[1:]] for i in keep}
    starts = [line for line, _ in records[1:]]
    return header, columns, lambda i: f"line {starts[i]}"


def read_json_rows(path: Path, where: str) -> tuple[list[str], Columns, Callable[[int], str]]:
    """(keys seen, columns, row -> 'line N' or 'item N') of a JSON-lines file, or of a JSON file holding a list of
    objects. A key missing from a row reads as None (refused later for a column the task uses)."""
    text = read_utf8(path, DataError, where)
    rows: list[dict[str, Any]] = []
    starts: list[str] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except _RepeatedKey as exc:
            raise DataError(f"{where}: {path} has an object with key '{exc.args[0]}' twice") from None
        for number, item in enumerate(items, start=1):
            rows.append(_object(item, f"item {number}", path, where))
            starts.append(f"item {number}")
    else:
        for number, line in enumerate(_lines(text), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: line {number} of {path} is not valid JSON ({exc.msg}, column "
                                f"{exc.colno})") from None
            except _RepeatedKey as exc:  # json keeps the last value in silence
                raise DataError(f"{where}: line {number} of {path} has key '{exc.args[0]}' twice") from None
            rows.append(_object(item, f"line {number}", path, where))
            starts.append(f"line {number}")
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = {key: [row.get(key) for row in rows] for key in keys}
    return keys, columns, lambda i: starts[i]


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _RepeatedKey(key)
        found[key] = value
    return found


def _object(item: Any, at: str, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: {at} of {path} is not a JSON object (got {type(item).__name__})")
    return item
