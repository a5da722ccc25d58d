"""Run folders in the Hydra app (issue 12, items 4, 6 and 9): checked before Hydra writes anything, so a folder never
ends up with files from two runs; one line for a bad model path, an unwritable results file, a resume with nothing
to resume or with a changed setting, Ctrl-C; the gpus launcher refuses GPU ids on a machine without GPUs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from app_fixtures import OFFLINE_ENV, make_small_sst2, make_tiny_model, records, run_cli, tiny_overrides
from unipelt.app.folders import check_run_folder, check_writable, result_config
from unipelt.errors import UnipeltError


def composed(**trainer) -> OmegaConf:
    return OmegaConf.create({"seed": 1, "name": "x", "model": {"name_or_path": "/m"},
                             "trainer": {"lr": 0.01, "resume": False, "progress": True, **trainer},
                             "logger": {"backend": "none"}})


def test_result_config_keeps_what_changes_a_result():
    flat = result_config(composed())
    assert flat == {"seed": 1, "model.name_or_path": "/m", "trainer.lr": 0.01}  # not progress, resume, logger, name


def test_the_folder_checks_name_the_problem(tmp_path):
    with pytest.raises(UnipeltError, match=r"^trainer.resume=true but .*last.pt does not exist; set "
                                           r"trainer.resume=false to start afresh$"):
        check_run_folder(tmp_path, composed(resume=True))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(UnipeltError, match=r"^run folder .* already holds another run \(checkpoints/last.pt\); "
                                           r"continue it with trainer.resume=true, or choose another hydra.run.dir$"):
        check_run_folder(tmp_path, composed())
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(composed(), tmp_path / ".hydra" / "config.yaml")
    check_run_folder(tmp_path, composed(resume=True, progress=False))  # progress does not change the result
    with pytest.raises(UnipeltError, match=r"^trainer.resume: trainer.lr was 0.01 in .*config.yaml but is 0.02 now; "
                                           r"a resumed run keeps every setting that changes its result"):
        check_run_folder(tmp_path, composed(resume=True, lr=0.02))


def test_an_unwritable_results_file_is_found_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UnipeltError, match=r"^results_file .*a_file/results.jsonl cannot be written \(.*\); set "
                                           r"results_file to a writable path$"):
        check_writable(tmp_path / "a_file" / "results.jsonl")
    check_writable(tmp_path / "ok" / "results.jsonl")


def test_gpu_ids_without_a_gpu_are_refused(monkeypatch):
    import torch
    from hydra_plugins.unipelt_launcher.gpus import visible_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match=r"^hydra/launcher=gpus: hydra.launcher.gpus=\[0, 1\] but no GPU is visible"):
        visible_gpus([0, 1])
    assert visible_gpus([0, 1], require_gpu=False) == ["0", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    return make_tiny_model(root / "model"), make_small_sst2(root / "sst2", n_train=128, n_eval=16)


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "unipelt.app.main", *args], cwd=cwd,
                                env={**os.environ, **OFFLINE_ENV}, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.slow
def test_one_run_per_folder_interrupt_and_resume_end_to_end(tiny, tmp_path):
    model, data = tiny
    folder = tmp_path / "run"
    args = [*tiny_overrides(model, data, "trainer.max_train_samples=128", "trainer.epochs=100",
                            "trainer.checkpoint_every=1"), f"hydra.run.dir={folder}"]
    first = _start([*args, "seed=1"], tmp_path, tmp_path / "first.log")
    _wait_for(folder / "checkpoints" / "last.pt", first)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    # a second run in the same folder: one line, and the folder's .hydra still describes the first run
    second = run_cli([*args, "seed=2"], cwd=tmp_path, check=False)
    assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr[-3000:]
    assert second.stderr.startswith(f"error: run folder {folder} is in use by pid {first.pid} on ")
    assert OmegaConf.load(folder / ".hydra" / "config.yaml").seed == 1
    # Ctrl-C: a checkpoint, one line, exit status 130, recorded as interrupted
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=300) == 130
    log = (tmp_path / "first.log").read_text()
    assert "Traceback" not in log and "interrupted: interrupted at step " in log, log[-3000:]
    (interrupted,) = records(folder / "results.jsonl")
    assert interrupted["status"] == "interrupted" and "continue with trainer.resume=true" in interrupted["reason"]
    # a resume with another learning rate is refused before Hydra rewrites the folder's record of the run
    changed = run_cli([*args, "seed=1", "trainer.resume=true", "trainer.lr=0.5"], cwd=tmp_path, check=False)
    assert changed.returncode == 2 and changed.stderr.startswith("error: trainer.resume: trainer.lr was 0.01 in ")
    assert OmegaConf.load(folder / ".hydra" / "config.yaml").trainer.lr == 0.01
    # nothing to resume in a fresh folder, a model path that does not exist, an unwritable results file
    fresh = run_cli([*args[:-1], f"hydra.run.dir={tmp_path / 'fresh'}", "trainer.resume=true"], cwd=tmp_path,
                    check=False)
    assert fresh.returncode == 2 and "does not exist; set trainer.resume=false to start afresh" in fresh.stderr
    nowhere = run_cli([*args[:-1], f"hydra.run.dir={tmp_path / 'x'}", "model.name_or_path=/nonexistent/model"],
                      cwd=tmp_path, check=False)
    assert nowhere.returncode == 2
    assert nowhere.stderr == "error: model.name_or_path '/nonexistent/model' does not exist\n"
    (tmp_path / "a_file").write_text("")
    unwritable = run_cli([*args[:-1], f"hydra.run.dir={tmp_path / 'y'}", f"results_file={tmp_path}/a_file/r.jsonl"],
                         cwd=tmp_path, check=False)
    assert unwritable.returncode == 2 and "cannot be written" in unwritable.stderr
    assert not (tmp_path / "y" / "checkpoints").exists()


def test_a_fresh_sweep_into_a_folder_with_results_is_refused(tmp_path):
    from unipelt.app.folders import check_sweep_folder

    check_sweep_folder(tmp_path, composed())
    (tmp_path / "results.jsonl").write_text("{}\n")
    with pytest.raises(UnipeltError, match=r"^sweep folder .* already holds results \(results.jsonl\); resume its "
                                           r"jobs with trainer.resume=true, or choose another hydra.sweep.dir$"):
        check_sweep_folder(tmp_path, composed())
    check_sweep_folder(tmp_path, composed(resume=True))


def test_a_non_finite_lr_by_method_is_named():
    from hydra import compose, initialize_config_module

    from unipelt.app.main import validate

    with initialize_config_module(config_module="unipelt.conf", version_base="1.3"):
        cfg = compose("train", overrides=["method=lora", "+lr_by_method.lora=nan"])
    with pytest.raises(UnipeltError, match=r"^lr_by_method.lora must be a positive finite number, got nan$"):
        validate(cfg)


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_a_refused_sweep_resume_keeps_each_jobs_record(tiny, tmp_path):
    """Hydra writes a sweep job's .hydra/config.yaml before any callback sees the job: a resume with a changed
    setting is refused by the trainer, and the job's record still describes the run its checkpoint holds."""
    model, data = tiny
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny_overrides(model, data), f"hydra.sweep.dir={sweep}", "seed=1,2"]
    run_cli(args, cwd=tmp_path)
    jobs = [sweep / "0", sweep / "1"]
    assert [OmegaConf.load(job / ".hydra" / "config.yaml").trainer.lr for job in jobs] == [0.01, 0.01]
    changed = run_cli([*args, "trainer.resume=true", "trainer.lr=0.5"], cwd=tmp_path, check=False)
    refused = [r for r in records(sweep / "results.jsonl") if r["status"] == "failed"]
    assert len(refused) == 2 and all("trainer.lr was 0.01" in r["reason"] for r in refused), changed.stderr[-3000:]
    for job in jobs:
        assert OmegaConf.load(job / ".hydra" / "config.yaml").trainer.lr == 0.01
        assert not (job / ".hydra.before_resume").exists()
    # the same settings resume (nothing left to train) and leave no copy behind
    run_cli([*args, "trainer.resume=true"], cwd=tmp_path)
    assert all(not (job / ".hydra.before_resume").exists() for job in jobs)
