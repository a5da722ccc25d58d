"""Data parallel: unipelt-train under torchrun with 2 CPU processes (gloo), batch 4 each, takes the same steps as one
process with batch 8: same training loss, metrics and adapter up to the rounding of the float sums whose order
differs (tests/numerics.py: each step averages the two halves' gradients where one process sums the batch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from app_fixtures import OFFLINE_ENV, make_small_sst2, make_tiny_model, records, run_cli, tiny_overrides
from numerics import assert_close_scaled, assert_close_trained

SPLIT_SUMS = "each step's gradient and loss mean as two halves averaged across the processes, carried on by AdamW"


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_two_cpu_processes_match_one_process_with_the_doubled_batch(tmp_path):
    model = make_tiny_model(tmp_path / "model", dropout=0.0)  # dropout off: the two runs draw masks differently
    data = make_small_sst2(tmp_path / "sst2")
    args = tiny_overrides(model, data, "trainer.device=cpu")
    single = tmp_path / "single"
    run_cli([*args, "trainer.batch_size=8", f"hydra.run.dir={single}"], cwd=tmp_path)
    ddp = tmp_path / "ddp"
    env = {**os.environ, **OFFLINE_ENV}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "unipelt.app.main", *args, "trainer.batch_size=4", f"hydra.run.dir={ddp}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (one,) = records(single / "results.jsonl")
    (two,) = records(ddp / "results.jsonl")  # rank 0 alone writes the record
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["steps"] == one["steps"] == 8
    ops = 2 * one["steps"]
    assert_close_scaled(two["train_loss"], one["train_loss"], ops=ops, dtype=torch.float32, reason=SPLIT_SUMS)
    assert_close_scaled(two["metrics"], one["metrics"], ops=ops, dtype=torch.float32, reason=SPLIT_SUMS)
    a, b = (load_file(d / "best_adapter" / "adapter_model.safetensors") for d in (single, ddp))
    assert a.keys() == b.keys()
    for name in a:
        assert_close_trained(b[name], a[name], lr=1e-2, reason=SPLIT_SUMS, msg=name)  # tiny_overrides' lr
