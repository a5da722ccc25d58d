"""unipelt-report never merges runs that differ in anything but the seed, counts each run once, lets the latest
record of a run folder win, and survives NaN scores (issue 12, items 3 and 5)."""

from __future__ import annotations

import math
import os
import re

import pytest

from unipelt.app.report import latest_per_run, main as report_main, summarize
from unipelt.app.results import append_record, read_records


def run(task="sst2", method="lora", seed=1, score=0.8, status="completed", **config):
    settings = {"trainer.lr": 1e-3, "model.name_or_path": "/models/a", "task.data_dir": "/data/sst2", **config}
    record = {"status": status, "task": task, "method": method, "seed": seed, "main_metric": "validation/accuracy",
              "params": {"percent": 0.5, "added": 10}, "config": {**settings, "seed": seed}}
    if status == "completed":
        record["score"] = score
    else:
        record["reason"] = "TrainingDiverged: loss became nan at step 3"
    return record


def test_an_lr_sweep_and_two_models_are_separate_rows_naming_the_keys(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    for lr, scores in ((1e-3, [0.8, 0.82]), (1e-2, [0.6, 0.7])):
        for seed, score in enumerate(scores):
            append_record(path, run(seed=seed, score=score, **{"trainer.lr": lr}))
    append_record(path, run(seed=0, score=0.9, **{"model.name_or_path": "/models/b"}))
    rows, failed = summarize(read_records([path]))
    got = {r.setting: (r.n, round(r.mean, 4)) for r in rows}
    assert got == {"model.name_or_path=/models/a, trainer.lr=0.001": (2, 0.81),
                   "model.name_or_path=/models/a, trainer.lr=0.01": (2, 0.65),
                   "model.name_or_path=/models/b, trainer.lr=0.001": (1, 0.9)}
    assert not failed
    assert report_main([str(tmp_path)]) == 0
    assert "differ in model.name_or_path, trainer.lr are separate rows" in capsys.readouterr().out


def test_older_records_without_config_group_by_their_overrides(tmp_path):
    records = [{"status": "completed", "task": "sst2", "method": "lora", "seed": s, "score": 0.5 + s / 10,
                "overrides": [f"seed={s}", f"trainer.lr={lr}"]} for s in (1, 2) for lr in ("1e-3", "1e-2")]
    rows, _ = summarize(records)
    assert sorted((r.setting, r.n) for r in rows) == [("trainer.lr=1e-2", 2), ("trainer.lr=1e-3", 2)]


def test_one_file_through_two_paths_counts_once(tmp_path):
    path = tmp_path / "sweep" / "results.jsonl"
    append_record(path, run(seed=1, score=0.8))
    append_record(path, run(seed=2, score=0.9))
    os.symlink(tmp_path / "sweep", tmp_path / "alias")
    rows, _ = summarize(read_records([tmp_path / "sweep", tmp_path / "alias", path]))
    assert [(r.n, r.seeds) for r in rows] == [(2, [1, 2])]


def test_an_interrupted_then_resumed_run_is_one_completed_run(tmp_path):
    path = tmp_path / "results.jsonl"
    first = {**run(status="interrupted", seed=3), "output_dir": str(tmp_path / "run"), "finished": "2026-01-01T10:00"}
    append_record(path, {**first, "reason": "TrainingInterrupted: interrupted at step 7/48"})
    append_record(path, {**run(seed=3, score=0.7), "output_dir": str(tmp_path / "run" / "."),
                         "finished": "2026-01-01T11:00"})
    rows, failed = summarize(read_records([path]))
    assert [(r.n, r.failed) for r in rows] == [(1, 0)] and failed == []
    # the order of the lines does not matter, the time does
    reordered = list(reversed(read_records([path])))
    assert [r["status"] for r in latest_per_run(reordered)] == ["completed"]


def test_a_local_run_and_its_wandb_copy_count_once():
    local = {**run(seed=1), "run_id": "abc", "source": "results.jsonl"}
    remote = {**run(seed=1), "run_id": "abc", "source": "wandb:me/unipelt/xyz"}
    other = {**run(seed=2), "run_id": "def", "source": "wandb:me/unipelt/uvw"}
    assert [r["run_id"] for r in latest_per_run([local, remote, other])] == ["abc", "def"]


def test_nan_scores_never_crash_the_report(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    append_record(path, {**run(seed=1, score=math.nan, task="stsb"), "main_metric": "validation/pearson"})
    append_record(path, {**run(seed=2, score=0.4, task="stsb"), "main_metric": "validation/pearson"})
    append_record(path, run(seed=1, score=0.8))
    assert report_main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| stsb | lora | - | validation/pearson | nan ± nan | 2 |" in table
    assert "| sst2 | lora | - | validation/accuracy | 0.8000 ± 0.0000 | 1 |" in table


@pytest.mark.parametrize("body, message", [
    (b'{"status": "completed"}\n\xff\n', r"^error: results: .*results.jsonl is not UTF-8 text \(line 2: byte "),
    (b'{"status": "completed"}\n[1, 2]\n', r"^error: results: .*results.jsonl:2 is not a JSON object$"),
])
def test_a_bad_results_file_is_one_line(tmp_path, capsys, body, message):
    (tmp_path / "results.jsonl").write_bytes(body)
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.match(message, err), err


@pytest.mark.parametrize("field, value, shown", [("score", "abc", "score 'abc'"), ("seed", "x", "seed 'x'"),
                                                 ("params", [1], "params [1]")])
def test_a_record_with_a_field_that_is_not_a_number_is_one_line(tmp_path, capsys, field, value, shown):
    path = tmp_path / "results.jsonl"
    append_record(path, {**run(seed=1), field: value, "output_dir": "/runs/a"})
    assert report_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: results: {path}: run /runs/a has {shown}, not a number\n"


def test_a_skipped_cells_record_does_not_split_the_completed_runs(tmp_path, capsys):
    """A sweep lists a refused cell under the method's name with the unsolved config (other sizes, unset axes):
    the completed runs still group by the keys that differ among them, and a value holding ', ' (a list of sites)
    does not garble the note naming those keys."""
    path = tmp_path / "results.jsonl"
    sites = "['ffn.up', 'ffn.down']"
    for budget in ("0.5%", "2%"):
        for seed in (1, 2):
            append_record(path, run(method="lora:representation=ffn", seed=seed, score=0.8,
                                    **{"method.budget": budget, "method.modules.0.at": sites, "dim": 9}))
    append_record(path, run(method="lora:representation=ffn", seed=1, status="skipped",
                            **{"method.budget": "0.1%", "method.modules.0.at": "(unsolved)", "dim": 8}))
    rows, failed = summarize(read_records([path]))
    assert [(r.setting, r.n) for r in rows] == [("method.budget=0.5%", 2), ("method.budget=2%", 2)]
    assert [r["setting"] for r in failed] == ["method.budget=0.1%"]
    assert report_main([str(tmp_path)]) == 0
    assert "differ in method.budget are separate rows" in capsys.readouterr().out
