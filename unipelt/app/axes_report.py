"""`unipelt-report --by <axis>`: the score per value of one design axis with the other axes held equal.

A run's axis values are read from the method it trained (the record's solved `method_spec`), so they hold for
ablation cells, presets and hand-written methods alike; a value joins its modules' values with '+' (the MAM
adapter's insertion is `parallel+parallel`), and compose `scale` carries its factor (`scale(4.0)`, `scale(learned)`).
Runs are compared only when everything else is equal: the task, the other axes, the modules' other options except
their sizes (the budget sets those), and every other setting except the seed (budget, model, learning rate...).
Each such context is one table row (a cell per value of the axis: mean ± std over seeds, with its added-parameter
%) and one line per value in the plot, score against added-parameter % as in He et al.'s Figure 5.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UnipeltError, allowed
from ..forms import FORMS, Form
from .ablation import AXES, granularity
from ..module_spec import ModuleSpec
from .report_common import checked_record, latest_per_run, mean_std, record_settings

# The keys every module has whatever its form (the four axes, where it acts, its lr and budget share)
COMMON_MODULE_KEYS = {f.name for f in dataclasses.fields(ModuleSpec)} - {"options"}


@dataclass
class Cell:
    value: str
    n: int
    mean: float
    std: float
    percent: float
    seeds: list[int]


@dataclass
class AxisRow:
    task: str
    metric: str
    context: dict[str, str]  # the other axes and settings, held equal
    cells: dict[str, Cell] = field(default_factory=dict)

    def best(self, greater_is_better: bool = True) -> str | None:
        finite = {v: c.mean for v, c in self.cells.items() if math.isfinite(c.mean)}
        if not finite:
            return None
        return (max if greater_is_better else min)(finite, key=finite.get)


# `representation` is read from `at`: the sub-layer a module modifies (He et al.'s axis), whatever its granularity;
# compared by it, the granularity (heads, sub-layer, projections) is held equal instead of the sites.
REPORT_AXES = (*AXES, "representation")


def _site(at: Any) -> str:
    return ",".join(at) if isinstance(at, list) else str(at)


def _sites(at: Any) -> list[str]:
    return [str(s) for s in at] if isinstance(at, list) else [str(at)]


def _representation(at: Any) -> str:
    """attn / cross_attn / ffn (or the site itself: embeddings, ffn.ln...) per site, distinct ones joined by '/'."""
    found = []
    for site in _sites(at):
        head = site.split(".")[0]
        value = head if head in ("attn", "cross_attn") or site in ("ffn", "ffn.up", "ffn.gate", "ffn.down") else site
        if value not in found:
            found.append(value)
    return "/".join(found)


def _granularity(at: Any) -> str:
    return "/".join(dict.fromkeys(granularity(site) for site in _sites(at)))


def axis_values(spec: dict[str, Any]) -> dict[str, str]:
    """form / at / insertion / compose / representation of a method (its to_dict() form), modules joined with '+',
    and the granularity of its sites (held equal when comparing representations)."""
    modules = spec.get("modules") or []
    if not modules:
        return {axis: "none" for axis in (*REPORT_AXES, "granularity")}
    values = {}
    for axis in (*REPORT_AXES, "granularity"):
        parts = []
        for module in modules:
            value = module.get("at" if axis in ("representation", "granularity") else axis)
            if axis == "at":
                value = _site(value)
            elif axis == "representation":
                value = _representation(value)
            elif axis == "granularity":
                value = _granularity(value)
            if axis == "compose" and value == "scale":  # LoRA's alpha: the factor is alpha / r at every size
                alpha = module.get("alpha")
                value = f"scale({alpha:g}/r)" if alpha is not None else f"scale({module.get('scale', 1.0)})"
            parts.append(str(value))
        values[axis] = "+".join(parts)
    return values


def _held_equal(axis: str) -> tuple[str, ...]:
    """The other axes a comparison by `axis` holds equal (sites and representation move together)."""
    if axis == "representation":
        return ("form", "granularity", "insertion", "compose")
    return tuple(a for a in AXES if a != axis)


def _form_sizes(form: Form) -> set[str]:
    return {key for key in (form.size_key, *form.size_companions, *form.solved_keys) if key is not None}


def size_options(form: str) -> set[str]:
    """The options of a form that a budget or training sets (its size, what follows it, what training solves): as
    the form declares them; for a form this install lacks, every form's."""
    if form in FORMS:
        return _form_sizes(FORMS[form])
    return set().union(*(_form_sizes(f) for f in FORMS.values()))


def _module_options(spec: dict[str, Any], axis: str) -> str:
    """The modules' options other than the axes, their sizes and (when the form is the axis) form-specific keys."""
    kept = []
    for module in spec.get("modules") or []:
        sizes = size_options(str(module.get("form")))
        options = {k: v for k, v in module.items()
                   if k not in (*AXES, "scale", "name") and k not in sizes
                   and (axis != "form" or k in COMMON_MODULE_KEYS)}
        kept.append(options)
    extra = {k: v for k, v in spec.items() if k not in ("name", "modules")}
    return json.dumps([kept, extra], sort_keys=True, default=str)


def _setting_items(record: dict[str, Any]) -> dict[str, str]:
    """Settings that are not the method itself (method.budget stays: it is part of the comparison)."""
    found = record_settings(record)
    return {k: json.dumps(v, default=str) if not isinstance(v, str) else v for k, v in found.items()
            if not k.startswith(("axes.", "method.", "lr_by_method.")) or k == "method.budget"}


def by_axis(records: Iterable[dict[str, Any]], axis: str) -> tuple[list[AxisRow], list[str]]:
    """Rows of completed runs per context, a cell per value of `axis`; and the values in order of appearance."""
    if axis not in REPORT_AXES:
        raise UnipeltError(f"unipelt-report --by: unknown axis '{axis}' (allowed: {allowed(REPORT_AXES)})")
    runs = [checked_record(r) for r in latest_per_run(records)]
    runs = [r for r in runs if r.get("status") == "completed" and r.get("score") is not None
            and isinstance(r.get("method_spec"), dict)]
    if not runs:
        raise UnipeltError(f"unipelt-report --by {axis}: no completed run with a recorded method")
    settings = [_setting_items(r) for r in runs]
    keys = sorted({k for s in settings for k in s})
    # shown and held equal: settings that differ between runs, and the budget always (it is the comparison's basis)
    differing = [k for k in keys if len({s.get(k, "(unset)") for s in settings}) > 1 or k == "method.budget"]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    contexts: dict[tuple, dict[str, str]] = {}
    values: list[str] = []
    for record, found in zip(runs, settings):
        axes = axis_values(record["method_spec"])
        value = axes[axis]
        if value not in values:
            values.append(value)
        context = {a: axes[a] for a in _held_equal(axis)}
        context.update({k: found.get(k, "(unset)") for k in differing})
        key = (str(record.get("task")), json.dumps(context, sort_keys=True), _module_options(record["method_spec"],
                                                                                              axis))
        contexts[key] = context
        groups[key + (value,)].append(record)
    rows: dict[tuple, AxisRow] = {}
    for (task, context_json, options, value), members in groups.items():
        key = (task, context_json, options)
        row = rows.setdefault(key, AxisRow(task=task, metric=str(members[0].get("main_metric")),
                                           context=contexts[key]))
        mean, std = mean_std([float(r["score"]) for r in members])
        percents = [float((r.get("params") or {}).get("percent") or math.nan) for r in members]
        row.cells[value] = Cell(value=value, n=len(members), mean=mean, std=std, percent=statistics.fmean(percents),
                                seeds=sorted(int(r.get("seed") or 0) for r in members))
    ordered = sorted(rows.values(), key=lambda r: (r.task, json.dumps(r.context, sort_keys=True)))
    return ordered, values


def format_by_axis(rows: list[AxisRow], values: list[str], axis: str, skipped: list[dict[str, Any]]) -> str:
    context_keys = [k for k in dict.fromkeys(k for r in rows for k in r.context)]
    head = ["task", *context_keys, *[f"{axis}={v}" for v in values], "best"]
    lines = [f"## Score by {axis} (mean ± std over seeds, added parameters %)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        best = row.best()
        cells = []
        for value in values:
            cell = row.cells.get(value)
            if cell is None:
                cells.append("-")
                continue
            text = f"{cell.mean:.4f} ± {cell.std:.4f} (n={cell.n}, {cell.percent:.3f}%)"
            cells.append(f"**{text}**" if value == best and len(row.cells) > 1 else text)
        lines.append("| " + " | ".join([row.task, *[row.context.get(k, "-") for k in context_keys], *cells,
                                         best or "-"]) + " |")
    lines += ["", f"Each row holds everything but {axis} equal (the other axes, module options, budget and settings); "
                  "sizes differ only as the budget solves them."]
    if skipped:
        lines += ["", f"Skipped or failed cells ({len(skipped)} records, each cell listed once):", ""]
        seen = set()
        for record in skipped:
            line = f"- {record.get('method')}: {record.get('status', 'failed')}: {record.get('reason', '-')}"
            if line not in seen:
                seen.add(line)
                lines.append(line)
    return "\n".join(lines)


def write_csv(rows: list[AxisRow], axis: str, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "context", axis, "mean", "std", "n", "seeds", "params_percent"])
        for row in rows:
            context = "; ".join(f"{k}={v}" for k, v in row.context.items())
            for cell in row.cells.values():
                writer.writerow([row.task, context, cell.value, cell.mean, cell.std, cell.n,
                                 " ".join(map(str, cell.seeds)), cell.percent])


def plot_by_axis(rows: list[AxisRow], values: list[str], axis: str, path: Path) -> Path:
    """Score against added-parameter %, one panel per task and context without its budget, a line per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[AxisRow]] = defaultdict(list)
    for row in rows:
        context = {k: v for k, v in row.context.items() if k != "method.budget"}
        panels[(row.task, json.dumps(context, sort_keys=True))].append(row)
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for index, value in enumerate(values):
            points = sorted((c.percent, c.mean, c.std) for r in panels[key] for v, c in r.cells.items() if v == value)
            if not points:
                continue
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="os^Dvx"[index % 6], capsize=3, label=f"{axis}={value}")
        xs = [c.percent for r in panels[key] for c in r.cells.values() if c.percent > 0]
        if xs and max(xs) / min(xs) > 4:
            ax.set_xscale("log")
        context = json.loads(key[1])
        title = ", ".join(f"{k}={v}" for k, v in context.items())
        ax.set_title(f"{key[0]}\n{title}", fontsize=8)
        ax.set(xlabel="fine-tuned parameters (%)", ylabel=panels[key][0].metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_by_axis(records: list[dict[str, Any]], axis: str, out: Path) -> str:
    """Writes report_by_<axis>.md / .csv / .png into `out`; returns the table."""
    rows, values = by_axis(records, axis)
    skipped = [r for r in latest_per_run(records) if r.get("status") != "completed"]
    table = format_by_axis(rows, values, axis, skipped)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"report_by_{axis}.md").write_text(table + "\n", encoding="utf-8")
    write_csv(rows, axis, out / f"report_by_{axis}.csv")
    plot_by_axis(rows, values, axis, out / f"report_by_{axis}.png")
    return table


__all__ = ["AxisRow", "Cell", "axis_values", "by_axis", "format_by_axis", "plot_by_axis", "report_by_axis",
           "size_options"]
