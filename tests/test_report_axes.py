"""unipelt-report --by <axis> on synthetic records: per axis value, mean ± std over seeds with the other axes, the
module options and the settings held equal; a table, a CSV and a PNG; skipped cells listed; bad axes refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from unipelt.app.axes_report import axis_values, by_axis
from unipelt.app.report import main as report_main
from unipelt.errors import UnipeltError


def _module(at: str, insertion: str, compose: str = "add", scale: float | str | None = None, dim: int = 24,
            activation: str = "relu") -> dict:
    module = {"form": "bottleneck", "at": [at], "insertion": insertion, "compose": compose, "name": "m0",
              "dim": dim, "activation": activation, "init": "bert"}
    if scale is not None:
        module["scale"] = scale
    return module


def _record(at: str, insertion: str, seed: int, score: float, budget: str = "0.5%", percent: float = 0.49,
            **module: object) -> dict:
    spec = {"name": f"pa:at={at},insertion={insertion}", "train_base": "none", "train_head": True,
            "modules": [_module(at, insertion, **module)]}
    return {"status": "completed", "task": "sst2", "method": spec["name"], "seed": seed, "score": score,
            "main_metric": "validation/accuracy", "greater_is_better": True, "method_spec": spec,
            "params": {"percent": percent, "added": 1000}, "run_id": f"{at}{insertion}{seed}{budget}{module}",
            "config": {"method.budget": budget, "seed": seed, "method.modules.0.at": at,
                       "method.modules.0.insertion": insertion, "trainer.lr": 0.003}}


def _insertion_grid(budget: str = "0.5%", percent: float = 0.49) -> list[dict]:
    scores = {("attn", "sequential"): (0.80, 0.82, 0.84), ("attn", "parallel"): (0.83, 0.85, 0.87),
              ("ffn", "sequential"): (0.81, 0.81, 0.81), ("ffn", "parallel"): (0.86, 0.88, 0.90)}
    return [_record(at, ins, seed, s, budget=budget, percent=percent)
            for (at, ins), values in scores.items() for seed, s in zip((1, 2, 3), values)]


def test_axis_values_join_modules_and_carry_the_scale():
    mam = {"modules": [{"form": "prefix", "at": ["attn.heads"], "insertion": "parallel", "compose": "gate"},
                       {"form": "bottleneck", "at": ["ffn"], "insertion": "parallel", "compose": "scale",
                        "scale": 4.0}]}
    assert axis_values(mam) == {"form": "prefix+bottleneck", "at": "attn.heads+ffn", "insertion": "parallel+parallel",
                                "compose": "gate+scale(4.0)", "representation": "attn+ffn",
                                "granularity": "heads+sub-layer"}
    assert axis_values({"modules": []})["form"] == "none"  # full fine-tuning / BitFit


def test_by_insertion_holds_the_site_equal_and_averages_over_seeds():
    rows, values = by_axis(_insertion_grid(), "insertion")
    assert values == ["sequential", "parallel"]
    assert [r.context["at"] for r in rows] == ["attn", "ffn"]  # one row per site: the other axis held equal
    attn = rows[0]
    assert attn.cells["sequential"].mean == pytest.approx(0.82) and attn.cells["sequential"].std == pytest.approx(0.02)
    assert attn.cells["parallel"].seeds == [1, 2, 3] and attn.cells["parallel"].n == 3
    assert rows[1].cells["sequential"].std == 0.0 and rows[1].best() == "parallel"


def test_other_axes_options_and_budgets_are_never_averaged_together():
    records = _insertion_grid() + _insertion_grid(budget="2%", percent=1.9)
    records.append(_record("ffn", "parallel", 1, 0.1, activation="none"))  # another module option: its own row
    rows, _ = by_axis(records, "insertion")
    assert len(rows) == 5  # 2 sites x 2 budgets, and the odd activation alone
    budgets = sorted({r.context["method.budget"] for r in rows})
    assert budgets == ["0.5%", "2%"]
    lone = [r for r in rows if set(r.cells) == {"parallel"} and r.cells["parallel"].n == 1]
    assert len(lone) == 1 and lone[0].cells["parallel"].mean == 0.1


def test_sizes_do_not_split_a_comparison():
    records = [_record("ffn", "sequential", 1, 0.8, dim=40), _record("ffn", "parallel", 1, 0.9, dim=24)]
    rows, _ = by_axis(records, "insertion")
    assert len(rows) == 1 and set(rows[0].cells) == {"sequential", "parallel"}


def test_compose_values_name_their_scale():
    records = [_record("ffn", "parallel", 1, 0.8, compose="scale", scale=4.0),
               _record("ffn", "parallel", 1, 0.7, compose="scale", scale="learned"),
               _record("ffn", "parallel", 1, 0.75)]
    rows, values = by_axis(records, "compose")
    assert values == ["scale(4.0)", "scale(learned)", "add"] and len(rows) == 1
    assert rows[0].best() == "scale(4.0)"


def test_nan_scores_are_shown_not_averaged_away():
    records = [_record("ffn", "parallel", 1, 0.8), _record("ffn", "parallel", 2, math.nan)]
    rows, _ = by_axis(records, "insertion")
    assert math.isnan(rows[0].cells["parallel"].mean) and rows[0].best() is None


def test_unknown_axis_and_no_runs_are_one_line_errors():
    with pytest.raises(UnipeltError, match="unknown axis 'site'.*allowed: form, at, insertion, compose"):
        by_axis(_insertion_grid(), "site")
    with pytest.raises(UnipeltError, match="no completed run"):
        by_axis([{**_insertion_grid()[0], "status": "failed"}], "insertion")


def test_cli_writes_table_csv_and_png_and_lists_skipped_cells(tmp_path: Path, capsys):
    records = _insertion_grid()
    records.append({"status": "skipped", "task": "sst2", "seed": 1, "method": "prefix:at=ffn", "run_id": "s1",
                    "reason": "MethodConfigError: form 'prefix' cannot act at 'ffn'"})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert report_main([str(tmp_path), "--by", "insertion", "--by", "at"]) == 0
    table = (tmp_path / "report_by_insertion.md").read_text()
    assert "| sst2 | bottleneck | attn | add | 0.5% | 0.8200 ± 0.0200 (n=3, 0.490%) |" in table
    assert "**0.8800 ± 0.0200 (n=3, 0.490%)** | parallel |" in table
    assert "prefix:at=ffn: skipped: MethodConfigError: form 'prefix' cannot act at 'ffn'" in table
    for name in ("report_by_insertion.csv", "report_by_insertion.png", "report_by_at.md", "report_by_at.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "skipped" in (tmp_path / "report.md").read_text()  # the main table lists it too
    assert report_main([str(tmp_path), "--by", "sites"]) == 2
    assert "unknown axis 'sites'" in capsys.readouterr().err


def test_notebook_shows_the_insertion_ablation_end_to_end(tmp_path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _insertion_grid()))
    monkeypatch.setenv("UNIPELT_RESULTS", str(tmp_path / "results.jsonl"))
    monkeypatch.setenv("UNIPELT_REPORT_DIR", str(tmp_path / "out"))
    monkeypatch.delenv("UNIPELT_AXIS", raising=False)
    notebook = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "ablation_insertion.ipynb",
                             as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                      for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "12 records: 12 completed runs" in outputs
    assert "**0.8800 ± 0.0200 (n=3, 0.490%)**" in outputs
    assert "at=ffn, compose=add, method.budget=0.5%: parallel - sequential = +0.0700 (std 0.0200): agrees" in outputs
    assert "at=attn, compose=add, method.budget=0.5%: parallel - sequential = +0.0300 (std 0.0200): agrees" in outputs
    assert (tmp_path / "out" / "report_by_insertion.png").stat().st_size > 0


def _lora(at: list[str], seed: int, score: float, dim: int) -> dict:
    record = _record("x", "parallel", seed, score, compose="scale", dim=dim, activation="none")
    module = record["method_spec"]["modules"][0]
    module.update(at=at, alpha=16, init="lora")
    record["run_id"] = f"{at}{seed}"
    record["config"]["method.modules.0.at"] = at
    return record


def test_by_representation_compares_lora_on_attention_and_ffn_weights_in_one_row():
    """LoRA on W_q, W_v against LoRA on W_1, W_2 (different sites, different solved r, so different alpha / r): one
    row, the granularity held equal, the scale shown as alpha / r."""
    records = [_lora(["attn.q", "attn.v"], seed, score, dim=12) for seed, score in ((1, 0.80), (2, 0.82))]
    records += [_lora(["ffn.up", "ffn.down"], seed, score, dim=5) for seed, score in ((1, 0.84), (2, 0.86))]
    records += [_record("attn", "parallel", 1, 0.7), _record("ffn", "parallel", 1, 0.9)]  # the PA: its own row
    rows, values = by_axis(records, "representation")
    assert values == ["attn", "ffn"]
    lora = next(r for r in rows if r.context["granularity"] == "projections")
    assert lora.context["compose"] == "scale(16/r)" and "at" not in lora.context
    assert lora.cells["attn"].mean == pytest.approx(0.81) and lora.cells["ffn"].mean == pytest.approx(0.85)
    sublayer = next(r for r in rows if r.context["granularity"] == "sub-layer")
    assert (sublayer.cells["attn"].mean, sublayer.cells["ffn"].mean) == (0.7, 0.9)
