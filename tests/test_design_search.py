"""design_search: the Optuna search over the axes and sizes at a fixed budget composes, runs (two trials on a tiny
model), writes best_method.yaml, and `unipelt-train method=<that file>` trains that method unchanged."""

from __future__ import annotations

import math

import pytest
import yaml
from app_fixtures import make_small_sst2, make_tiny_model, records, run_cli
from hydra import compose, initialize_config_module

import unipelt
import unipelt.app.main  # noqa: F401
from unipelt.app.design_search import best_record, write_best_method
from unipelt.errors import UnipeltError

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # installed with the dev extra

TINY = ["logger=none", "trainer.max_train_samples=32", "trainer.max_eval_samples=32", "trainer.batch_size=8",
        "trainer.max_length=32", "trainer.progress=false"]


def test_design_search_composes_as_an_optuna_search_at_a_fixed_budget():
    with initialize_config_module(config_module="unipelt.conf", version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=design_search"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    params = cfg.hydra.sweeper.params
    assert params["method.modules.1.insertion"] == "choice(sequential, parallel)"
    assert params["axes.sizes.prefix"].startswith("int(")
    assert cfg.method.budget == "0.5%"
    assert cfg.hydra.callbacks.best_method._target_ == "unipelt.app.design_search.BestMethodWriter"


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_search_writes_a_method_file_that_unipelt_train_runs_unchanged(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = make_small_sst2(tmp_path / "data", n_train=32, n_eval=32)
    sweep = tmp_path / "search"
    run_cli(["-m", "+experiment=design_search", f"model.name_or_path={model}", f"task.data_dir={data}", *TINY,
             "method.budget=5%", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    trials = [r for r in records(sweep / "results.jsonl") if r["status"] == "completed"]
    assert len(trials) == 2
    best_file = sweep / "best_method.yaml"
    written = yaml.safe_load(best_file.read_text())
    best = max(trials, key=lambda r: r["score"])
    assert written == best["method_spec"] and "budget" not in written  # sizes solved, nothing left to solve
    assert "# trained with trainer.lr=" in best_file.read_text()

    again = tmp_path / "again"
    run_cli([f"method={best_file}", f"model.name_or_path={model}", f"task.data_dir={data}", *TINY,
             f"trainer.lr={best['lr']}", f"seed={best['seed']}", f"hydra.run.dir={again}"], cwd=tmp_path)
    (rerun,) = records(again / "results.jsonl")
    assert rerun["status"] == "completed"
    assert rerun["method_spec"] == written and rerun["params"]["added"] == best["params"]["added"]
    assert rerun["score"] == pytest.approx(best["score"])  # same method, data, seed and rate: the same run


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_a_bad_method_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodules: [{form: prefix, at: ffn, insertion: parallel, compose: gate}]\n")
    proc = run_cli([f"method={bad}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: method 'x' module 0: form 'prefix' cannot act at 'ffn' (allowed at: attn.heads, cross_attn.heads)")
    proc = run_cli([f"method={tmp_path / 'missing.yaml'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "method file not found" in proc.stderr


def test_best_record_follows_the_task_direction_and_refuses_nothing_to_pick(tmp_path):
    spec = unipelt.load_method("lora").to_dict()
    runs = [{"status": "completed", "score": s, "greater_is_better": False, "method_spec": spec, "seed": 1,
             "params": {"percent": 0.1}} for s in (0.3, 0.1, math.nan)]
    assert best_record(runs)["score"] == 0.1  # a loss: smaller wins, NaN never does
    with pytest.raises(UnipeltError, match="no completed run"):
        write_best_method([{"status": "skipped"}], tmp_path / "best.yaml")
    assert not (tmp_path / "best.yaml").exists()
