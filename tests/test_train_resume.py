"""Resumable training: a run killed with SIGKILL at a random step and restarted with trainer.resume=true ends with
exactly the metrics, loss and best adapter of an uninterrupted run (CPU, dropout on, crossing an epoch boundary)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from app_fixtures import OFFLINE_ENV, make_small_sst2, make_tiny_model, records, run_cli, tiny_overrides


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while the job runs
        return subprocess.Popen([sys.executable, "-m", "unipelt.app.main", *args], cwd=cwd,
                                env={**os.environ, **OFFLINE_ENV}, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_kill_9_then_resume_gives_the_uninterrupted_result(tmp_path):
    model = make_tiny_model(tmp_path / "model", dropout=0.1)  # dropout: the RNG state must be restored too
    data = make_small_sst2(tmp_path / "sst2")
    # 128 examples / batch 8 = 16 steps an epoch, 3 epochs; evaluation every 10 steps, a checkpoint every 3
    args = tiny_overrides(model, data, "trainer.max_train_samples=128", "trainer.epochs=3", "trainer.eval_every=10",
                          "trainer.checkpoint_every=3", "trainer.log_every=5")
    reference = _start([*args, f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path, tmp_path / "reference.log")
    victim_dir = tmp_path / "victim"
    victim = _start([*args, f"hydra.run.dir={victim_dir}"], tmp_path, tmp_path / "victim.log")
    checkpoint = victim_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    if (victim_dir / "results.jsonl").exists():
        pytest.fail("the victim finished before it could be killed; the test needs a longer run")
    assert victim.returncode == -signal.SIGKILL

    run_cli([*args, f"hydra.run.dir={victim_dir}", "trainer.resume=true"], cwd=tmp_path)
    (expected,) = records(tmp_path / "reference" / "results.jsonl")
    (resumed,) = records(victim_dir / "results.jsonl")
    assert resumed["resumed_from"] and 0 < resumed["resumed_from"] < resumed["steps"] == expected["steps"] == 48
    for key in ("metrics", "score", "best_step", "train_loss", "stopped_early"):
        assert resumed[key] == expected[key], key  # exactly, not approximately
    saved = [load_file(d / "best_adapter" / "adapter_model.safetensors") for d in (tmp_path / "reference", victim_dir)]
    assert saved[0].keys() == saved[1].keys()
    assert all(saved[0][k].equal(saved[1][k]) for k in saved[0])
