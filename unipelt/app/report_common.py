"""What both reports (unipelt-report's table and its `--by <axis>` tables) read from results records the same way:
one record per run, the numbers checked, the settings that change a result, and a mean ± std over seeds."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable

from ..errors import UnipeltError


def _run_key(record: dict[str, Any]) -> str:
    """What identifies a run: its folder (resolved), else its run id, else the record itself."""
    folder = record.get("output_dir")
    if folder:
        source = Path(str(record.get("source", "."))).parent
        return "dir:" + os.path.realpath(Path(source, folder))
    return f"id:{record.get('run_id') or id(record)}"


def latest_per_run(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per run: W&B copies of local runs dropped (same run id), and the latest record of a folder."""
    records = list(records)
    local_ids = {r.get("run_id") for r in records if r.get("run_id") and not str(r.get("source", "")).startswith(
        "wandb:")}
    kept: dict[str, tuple[int, dict[str, Any]]] = {}
    for order, record in enumerate(records):
        if str(record.get("source", "")).startswith("wandb:") and record.get("run_id") in local_ids:
            continue
        key = _run_key(record)
        stamp = (str(record.get("finished") or ""), order)
        if key not in kept or stamp >= kept[key][0]:
            kept[key] = (stamp, record)
    return [record for _, record in sorted(kept.values(), key=lambda item: item[0][1])]


def record_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The record's result-changing settings: its flat `config`, else its `key=value` overrides (older records)."""
    config = record.get("config")
    if isinstance(config, dict):
        found = dict(config)
    else:
        overrides = record.get("overrides")
        overrides = overrides if isinstance(overrides, list) else []
        found = dict(str(o).split("=", 1) for o in overrides if "=" in str(o) and not str(o).startswith("hydra"))
        found = {k.lstrip("+~"): v for k, v in found.items()}
    for key in ("seed", "task", "method"):
        found.pop(key, None)
    return found


def checked_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record whose numbers are numbers, or one line naming its file, its run and the field."""
    def bad(field: str, value: Any) -> UnipeltError:
        run = record.get("output_dir") or record.get("run_id") or f"seed {record.get('seed')}"
        return UnipeltError(f"results: {record.get('source', 'a record')}: run {run} has {field} {value!r}, not a "
                            "number")

    score = record.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise bad("score", score)
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", seed)
    params = record.get("params")
    if params is not None and not isinstance(params, dict):
        raise bad("params", params)
    for field in ("percent", "added"):
        value = (params or {}).get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(f"params.{field}", value)
    return record


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for both when any value is not finite."""
    if any(not math.isfinite(v) for v in values):  # a NaN score is shown, never averaged away, never a crash
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


__all__ = ["checked_record", "latest_per_run", "mean_std", "record_settings"]
