"""unipelt-report: a table (mean ± std over seeds per task × method × setting, parameter %) and a params-vs-score
plot from finished runs: local results files (results.jsonl, found recursively under the folders given) and, with
`--wandb ENTITY/PROJECT`, runs fetched through wandb.Api. Failed jobs are listed with their reasons.

Runs are grouped by everything that changes a result except the seed: besides task and method, every config key
whose value differs between runs of the same task and method (an lr sweep, two models) splits the group, and the
row's `setting` names those keys and values; a mean ± std is only ever over seeds. Each run counts once: a file
reached through two paths is read once, a run's record seen twice (a local file and W&B) counts once, and for a run
folder with several records (interrupted, then resumed) the latest one wins.

    unipelt-report multirun/default          # writes report.md, report.csv, params_vs_score.png there
    unipelt-report outputs multirun --out reports/ --wandb me/unipelt
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import UnipeltError
from .axes_report import report_by_axis
from .folders import result_config
from .report_common import checked_record, latest_per_run, mean_std, record_settings
from .results import read_records

TABLE, CSV, PLOT = "report.md", "report.csv", "params_vs_score.png"


@dataclass
class Row:
    task: str
    method: str
    metric: str  # "<split>/<metric>" averaged
    n: int  # completed runs (seeds)
    mean: float
    std: float  # sample standard deviation over seeds (0 for one run)
    percent: float  # added parameters in % of the base model (mean over runs)
    added: int
    seeds: list[int]
    failed: int
    setting: str = ""  # the swept keys (other than task, method and seed) that single out this group: "k=v, ..."
    setting_keys: tuple[str, ...] = ()  # those keys


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def summarize(records: Iterable[dict[str, Any]]) -> tuple[list[Row], list[dict[str, Any]]]:
    """Completed runs grouped by (task, method, differing settings); returns the rows and the failed records."""
    records = [checked_record(r) for r in latest_per_run(records)]
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_pair[(str(record.get("task")), str(record.get("method")))].append(record)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    keys_of: dict[tuple[str, str], tuple[str, ...]] = {}  # (task, method) -> the keys that split its runs
    failed_by: dict[tuple, int] = defaultdict(int)
    failed = []
    for (task, method), runs in by_pair.items():
        settings = [record_settings(r) for r in runs]
        # the keys that split completed runs: a skipped or failed job's record (a refused cell's config is the
        # unsolved one) must not split the runs that completed, but is shown with the same keys
        done = [s for r, s in zip(runs, settings) if r.get("status") == "completed"] or settings
        keys = sorted({k for s in done for k in s})
        differing = [k for k in keys
                     if len({json.dumps(s.get(k, "(unset)"), default=str, sort_keys=True) for s in done}) > 1]
        keys_of[(task, method)] = tuple(differing)
        for record, found in zip(runs, settings):
            setting = ", ".join(f"{k}={found.get(k, '(unset)')}" for k in differing)
            key = (task, method, setting)
            record["setting"] = setting
            if record.get("status") == "completed" and record.get("score") is not None:
                groups[key].append(record)
            else:
                failed.append(record)
                failed_by[key] += 1
    rows = []
    for (task, method, setting), runs in sorted(groups.items()):
        scores = [float(r["score"]) for r in runs]
        percents = [_number((r.get("params") or {}).get("percent")) for r in runs]
        added = [int((r.get("params") or {}).get("added") or 0) for r in runs]
        mean, std = mean_std(scores)
        rows.append(Row(task=task, method=method, metric=str(runs[0].get("main_metric")), n=len(runs), mean=mean,
                        std=std, percent=statistics.fmean(percents), added=round(statistics.fmean(added)),
                        seeds=sorted(int(r.get("seed") or 0) for r in runs),
                        failed=failed_by.get((task, method, setting), 0), setting=setting,
                        setting_keys=keys_of[(task, method)]))
    return rows, failed


def format_table(rows: list[Row], failed: list[dict[str, Any]]) -> str:
    lines = ["| task | method | setting | metric | score (mean ± std) | seeds | params % | added params | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.task} | {r.method} | {r.setting or '-'} | {r.metric} | {r.mean:.4f} ± {r.std:.4f} | "
                     f"{r.n} | {r.percent:.4f} | {r.added:,} | {r.failed} |")
    swept = sorted({key for r in rows for key in r.setting_keys})  # not parsed back: a value may hold ", "
    if swept:
        lines += ["", f"Runs of one task and method that differ in {', '.join(swept)} are separate rows; each mean is "
                      "over seeds only."]
    if failed:
        lines += ["", f"Failed, interrupted or skipped jobs ({len(failed)}):", ""]
        for record in failed:
            setting = f" / {record['setting']}" if record.get("setting") else ""
            lines.append(f"- {record.get('task')} / {record.get('method')}{setting} / seed {record.get('seed')}: "
                         f"{record.get('status', 'failed')}: {record.get('reason', 'no reason recorded')}")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "method", "setting", "metric", "mean", "std", "n", "seeds", "params_percent", "added",
                         "failed"])
        for r in rows:
            writer.writerow([r.task, r.method, r.setting, r.metric, r.mean, r.std, r.n, " ".join(map(str, r.seeds)),
                             r.percent, r.added, r.failed])


def plot(rows: list[Row], path: Path) -> Path:
    """Score against parameter % (log axis), one panel per task, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in rows}) or ["(no completed runs)"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r.task == task):
            label = f"{r.method} ({r.setting})" if r.setting else r.method
            ax.errorbar([r.percent], [r.mean], yerr=[r.std], fmt="o", capsize=3, label=label)
            ax.annotate(label, (r.percent, r.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if any(r.task == task and r.percent > 0 for r in rows):
            ax.set_xscale("log")
        metric = next((r.metric for r in rows if r.task == task), "score")
        ax.set(title=task, xlabel="added parameters (% of base model)", ylabel=metric)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wandb_records(project: str, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Finished W&B runs of ENTITY/PROJECT as results records (needs network and an API key)."""
    import wandb

    records = []
    for run in wandb.Api().runs(project, filters=filters or {}):
        config, summary = run.config, run.summary
        main = next((k for k in summary.keys() if k.startswith("best/") and k != "best/step"), None)
        records.append({
            "task": (config.get("task") or {}).get("name"), "method": (config.get("method_solved") or {}).get("name"),
            "seed": config.get("seed"), "status": "completed" if run.state == "finished" else "failed",
            "reason": f"W&B state {run.state}", "score": summary.get(main) if main else None,
            "main_metric": main[len("best/"):] if main else None,
            "params": {"percent": summary.get("params/percent"), "added": summary.get("params/added")},
            "source": f"wandb:{project}/{run.id}", "run_id": config.get("run_id") or run.id,
            "config": result_config(dict(config)),
        })
    return records


def report(sources: list[str], out: Path, wandb_project: str | None = None,
           by: list[str] | None = None) -> tuple[list[Row], str]:
    """Writes the table, CSV and plot into `out`; with `by`, also report_by_<axis>.md/.csv/.png per axis."""
    records = read_records(sources) if sources else []
    if wandb_project:
        records += wandb_records(wandb_project)
    if not records:
        raise UnipeltError(f"unipelt-report: no results found in {', '.join(sources) or '(no paths)'}")
    rows, failed = summarize(records)
    table = format_table(rows, failed)
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE).write_text(table + "\n", encoding="utf-8")
    write_csv(rows, out / CSV)
    plot(rows, out / PLOT)
    if by:
        table += "".join("\n\n" + report_by_axis(records, axis, out) for axis in by)
    return rows, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unipelt-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=None,
                        help="results.jsonl files or folders searched for them (default: outputs/ and multirun/)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the table and plot "
                        "(default: the first folder given, else the current folder)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None, help="also read runs from W&B")
    parser.add_argument("--by", metavar="AXIS", action="append", default=None,
                        help="also the score per value of a design axis (form, at, insertion, compose, "
                             "representation) with the other axes held equal: report_by_<axis>.md/.csv/.png "
                             "(repeatable)")
    args = parser.parse_args(argv)
    paths = args.paths or [p for p in ("outputs", "multirun") if Path(p).is_dir()]
    out = args.out or next((Path(p) for p in paths if Path(p).is_dir()), Path("."))
    try:
        _, table = report(paths, out, args.wandb, args.by)
    except UnipeltError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table)
    by_files = "".join(f", {out}/report_by_{axis}.md/.csv/.png" for axis in args.by or [])
    print(f"\nwrote {out / TABLE}, {out / CSV}, {out / PLOT}{by_files}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
