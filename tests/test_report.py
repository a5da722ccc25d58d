"""unipelt-report: the table equals the statistics of the results it read (mean ± std over seeds, params %), failed
jobs are listed with their reasons, the PNG exists; the notebook runs the same on a small results file (nbclient)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from needs import need_module

from unipelt.app.report import main as report_main
from unipelt.app.results import append_record, read_records

REPO = Path(__file__).resolve().parents[1]
SCORES = {("sst2", "lora"): [0.81, 0.84, 0.83], ("sst2", "mam_glue"): [0.85, 0.82], ("rte", "lora"): [0.61]}
PERCENT = {"lora": 0.2645, "mam_glue": 0.66}


def write_results(path: Path) -> None:
    for (task, method), scores in SCORES.items():
        for seed, score in enumerate(scores, start=1):
            append_record(path, {"status": "completed", "task": task, "method": method, "seed": seed,
                                 "score": score, "main_metric": "validation/accuracy",
                                 "metrics": {"validation/accuracy": score},
                                 "params": {"percent": PERCENT[method], "added": 1000}})
    append_record(path, {"status": "failed", "task": "sst2", "method": "lora", "seed": 9,
                         "reason": "TrainingDiverged: loss became nan at step 12"})


def parse_table(text: str) -> dict[tuple[str, str], tuple[float, float, int, float, int]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or cells[0] in ("task", "---"):
            continue
        mean, std = (float(x) for x in cells[4].split("±"))
        rows[(cells[0], cells[1])] = (mean, std, int(cells[5]), float(cells[6]), int(cells[8]))
    return rows


def test_table_equals_the_results_and_png_exists(tmp_path, capsys):
    write_results(tmp_path / "sweep" / "results.jsonl")
    assert len(read_records([tmp_path])) == 7
    assert report_main([str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "sweep" / "report.md").read_text()
    assert table.strip() in printed
    rows = parse_table(table)
    assert set(rows) == set(SCORES)
    for key, scores in SCORES.items():
        mean, std, n, percent, failed = rows[key]
        assert mean == pytest.approx(statistics.fmean(scores), abs=5e-5)
        assert std == pytest.approx(statistics.stdev(scores) if len(scores) > 1 else 0.0, abs=5e-5)
        assert n == len(scores) and percent == pytest.approx(PERCENT[key[1]], abs=5e-4)
        assert failed == (1 if key == ("sst2", "lora") else 0)
    assert "TrainingDiverged: loss became nan at step 12" in table
    png = tmp_path / "sweep" / "params_vs_score.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (tmp_path / "sweep" / "report.csv").read_text().count("\n") == 1 + len(SCORES)


def test_no_results_is_a_clear_error(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no results found" in capsys.readouterr().err


def test_notebook_runs_on_a_results_file(tmp_path, monkeypatch):
    nbformat = need_module("nbformat")
    nbclient = need_module("nbclient")
    write_results(tmp_path / "results.jsonl")
    monkeypatch.setenv("UNIPELT_RESULTS", str(tmp_path / "results.jsonl"))
    monkeypatch.setenv("UNIPELT_REPORT_DIR", str(tmp_path / "out"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    notebook = nbformat.read(REPO / "notebooks" / "compare_methods.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                      for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "7 runs" in outputs and "0.8267 ± 0.0153" in outputs  # sst2 / lora over three seeds
    assert "sst2: mam_glue 0.8350" in outputs
    assert (tmp_path / "out" / "params_vs_score.png").is_file()
