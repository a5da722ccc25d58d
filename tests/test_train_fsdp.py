"""Sharded training (trainer.strategy=fsdp, FSDP2 on CPU over gloo, 2 processes) gives what one process gives with
the doubled batch: per-step losses, metrics and the saved adapter files equal up to the rounding of the float sums
whose order differs (tests/numerics.py), and AdaLoRA masks and importance scores identical on every rank. One
torchrun runs every family and preset in one process group (tests/fsdp_worker.py); the CLI, kill -9 / resume and
refusals are tested below."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from app_fixtures import OFFLINE_ENV, make_small_sst2, make_tiny_model, records, run_cli, tiny_overrides
from needs import need_module
from numerics import assert_close_scaled, assert_close_trained
from unipelt.errors import UnipeltError
from unipelt.train import TrainConfig
from unipelt.train.config import check

HERE = Path(__file__).resolve().parent
PRESETS = ("lora", "mam", "prefix", "prompt_tuning", "adalora", "unipelt")
# beside_lora_<preset>: the preset trained beside a frozen LoRA (several adapters on one sharded model)
JOBS = {"llama": PRESETS + ("qlora_adamw", "beside_lora_houlsby"), "bert": PRESETS + ("learned_scale",),
        "bart": PRESETS}
# Each step reduces the gradient as two halves averaged across the processes where one process sums the doubled
# batch, and the loss mean likewise; every optimizer step carries what differs on.
SPLIT_SUMS = "each step's gradient and loss mean as two halves averaged across the processes, carried on"


LR = 1e-2  # the learning rate of tests/fsdp_worker.py and of app_fixtures.tiny_overrides


def _close(actual, expected, steps: int, msg: str = "") -> None:
    plain = not isinstance(actual, torch.Tensor)  # numbers from the JSON report: float32 results
    assert_close_scaled(actual, expected, ops=2 * steps, dtype=torch.float32 if plain else None, reason=SPLIT_SUMS,
                        msg=msg)


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


# every other preset, on the families it applies to (BitFit needs biases: not Llama), and GPT-2 (a fused
# projection) and T5 (relative position bias passed between layers); a second launch, slow
MORE_JOBS = {"llama": ("houlsby", "pfeiffer", "pa", "scaled_pa", "mh_pa", "ia3", "p_tuning", "p_tuning_v2", "full"),
             "bart": ("houlsby", "bitfit", "ia3", "p_tuning", "p_tuning_v2", "mh_pa", "full"),
             "bert": ("bitfit", "full", "p_tuning_v2"), "gpt2": ("lora", "prefix", "adalora", "prompt_tuning"),
             "t5": ("lora", "mam", "prompt_tuning", "adalora")}


def _launch(out: Path, jobs: dict[str, tuple[str, ...]]) -> dict:
    args = [f"{family}:{','.join(presets)}" for family, presets in jobs.items()]
    proc = subprocess.run(_torchrun([str(HERE / "fsdp_worker.py"), str(out), *args]), cwd=out,
                          env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    need_module("bitsandbytes")
    return _launch(tmp_path_factory.mktemp("fsdp"), JOBS)


@pytest.fixture(scope="module")
def more_report(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("fsdp_more"), MORE_JOBS)


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
@pytest.mark.parametrize("job", [f"{f}:{p}" for f, presets in JOBS.items() for p in presets])
def test_fsdp_equals_one_process_with_the_doubled_batch(report, job):
    _check_equal(report[job])


@pytest.mark.slow
@pytest.mark.parametrize("job", [f"{f}:{p}" for f, presets in MORE_JOBS.items() for p in presets])
def test_every_other_preset_under_fsdp_equals_one_process(more_report, job):
    _check_equal(more_report[job])


def _check_equal(entry: dict) -> None:
    assert "error" not in entry, entry.get("error")
    sharded, single = entry["fsdp"], entry["single"]
    assert len(sharded["losses"]) == len(single["losses"]) == 3
    for step, (loss, reference) in enumerate(zip(sharded["losses"], single["losses"])):
        _close(loss, reference, steps=step + 1, msg=f"loss of step {step + 1}")
    _close(sharded["metrics"], single["metrics"], steps=3)
    # the saved adapter: rank 0 gathered it and wrote the single-process files
    a, b = (Path(entry[kind]["adapter"]) for kind in ("fsdp", "single"))
    assert json.loads((a / "unipelt_adapter.json").read_text()) == json.loads((b / "unipelt_adapter.json").read_text())
    ta, tb = (load_file(d / "adapter_model.safetensors") for d in (a, b))
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert ta[name].shape == tb[name].shape and ta[name].dtype == tb[name].dtype, name
        # (an empty tensor: every triplet pruned away)
        assert_close_trained(ta[name], tb[name], lr=LR, reason=SPLIT_SUMS, msg=name)
    if "frozen_change" in single:  # the other adapter on the model: untouched, bit for bit, on both sides
        assert sharded["frozen_count"] == single["frozen_count"] > 0
        assert sharded["frozen_change"] == single["frozen_change"] == 0.0
    if "rank_mask" in single:  # AdaLoRA: pruned to the target, from the same scores, on every rank
        assert sum(single["rank_mask"]) < len(single["rank_mask"])  # something was pruned
        assert sharded["rank_mask"] == single["rank_mask"]
        _close(sharded["scores"], single["scores"], steps=3, msg="importance scores")
        masks, scores = zip(*sharded["per_rank"])
        assert all(m == masks[0] for m in masks) and all(s == scores[0] for s in scores)  # exactly


def test_strategy_is_checked():
    with pytest.raises(UnipeltError, match="trainer.strategy: unknown value 'zero3'"):
        check(TrainConfig(strategy="zero3"))
    with pytest.raises(UnipeltError, match="fp16.*fsdp"):
        check(TrainConfig(strategy="fsdp", precision="fp16"))


def test_4bit_storage_as_float_is_exact_or_refused():
    """A 4-bit layer re-stored as float32 (what FSDP gathers) computes exactly what it computed; one whose packed
    bytes do not fill whole float32 words is refused in one line saying what is needed."""
    need_module("bitsandbytes")
    import unipelt
    from unipelt.quantize import quantize_module
    from unipelt.train.sharding import check_4bit, store_4bit_as

    spec = unipelt.load_method("qlora")
    layer = torch.nn.Sequential(quantize_module(torch.nn.Linear(8, 4), spec))
    x = torch.randn(2, 8)
    before = layer(x)
    check_4bit(layer, torch.float32)
    store_4bit_as(layer, torch.float32)
    assert layer[0].weight.dtype == torch.float32 and layer[0].weight.shape == (4, 1)
    assert layer(x).equal(before)
    odd = torch.nn.Sequential(quantize_module(torch.nn.Linear(3, 2), spec))  # 6 weights: 3 packed bytes
    with pytest.raises(UnipeltError, match="'0' packs 3 bytes, not a multiple of 4; FSDP needs it stored as"):
        check_4bit(odd, torch.float32)


def test_bitsandbytes_optimizer_refused_under_fsdp():
    from unipelt.train.sharding import check_optimizer

    check_optimizer(None)
    check_optimizer("adamw")
    with pytest.raises(UnipeltError, match="paged_adamw_8bit.*adamw"):
        check_optimizer("paged_adamw_8bit")


def test_save_adapter_of_a_sharded_model(tmp_path):
    """In one process group of one rank: plain unipelt.save_adapter refuses the sharded model, naming the call to
    use; sharding.save_adapter writes the files the unsharded model writes (AdaLoRA pruned, prefix folded)."""
    import torch.distributed as dist

    import unipelt
    from tiny_models import perturb_adapters, tiny_model
    from unipelt.attach import state_of
    from unipelt.train import sharding
    from unipelt.train.distributed import Dist

    method = {"name": "both", "modules": [
        {"form": "prefix", "at": "attn.heads", "insertion": "parallel", "compose": "gate", "length": 3, "mlp_dim": 8},
        {"form": "svd", "at": ["attn.q"], "insertion": "parallel", "compose": "scale", "scale": 2.0, "init_r": 4,
         "target_r": 2}]}
    model = perturb_adapters(unipelt.attach(tiny_model("llama"), method))
    allocator = next(c for c in state_of(model).controllers.values() if hasattr(c, "triplet_scores"))
    for form in allocator.forms.values():
        keep = torch.ones(form.rank, dtype=torch.bool)
        keep[0] = False
        form.apply_mask(keep, final=True)  # pruned: saved as the kept triplets only
    unipelt.save_adapter(model, tmp_path / "plain")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharding.shard(model, Dist(rank=0, world_size=1), "fp32")
        with pytest.raises(unipelt.errors.AdapterFileError, match="sharded.*sharding.save_adapter"):
            unipelt.save_adapter(model, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        sharding.save_adapter(model, tmp_path / "sharded", Dist(rank=0, world_size=1))
        assert sharding.is_sharded(model) and any(hasattr(p, "full_tensor") for p in model.parameters())
    finally:
        dist.destroy_process_group()
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "sharded"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (tmp_path / "plain" / "unipelt_adapter.json").read_text() == \
        (tmp_path / "sharded" / "unipelt_adapter.json").read_text()


def test_bf16_policy_keeps_float32_masters_and_reduces_in_float32(tmp_path):
    """precision bf16 (a CUDA setting; the policy itself runs on CPU too): a base loaded in bf16 stays bf16 and
    sharded, the adapters become float32 masters, forward computes in bf16, the gradients arrive in float32."""
    import torch.distributed as dist

    import unipelt
    from tiny_models import tiny_model, tiny_batch
    from unipelt.train import sharding
    from unipelt.train.distributed import Dist

    model = unipelt.attach(tiny_model("llama").to(torch.bfloat16), "lora")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharding.shard(model, Dist(rank=0, world_size=1), "bf16")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
        model.train()
        out = model(**tiny_batch("llama"))
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        grads = [p.grad for p in trainable.values()]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
    finally:
        dist.destroy_process_group()


def test_multi_task_slurm_job_gets_its_ranks_from_submitit(monkeypatch):
    """hydra/launcher=slurm with several tasks starts each task without torchrun: the ranks come from SLURM's
    variables (through submitit), every GPU of the node stays visible to every task."""
    from unipelt.train.distributed import _export_slurm_ranks

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CUDA_VISIBLE_DEVICES", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.setenv(key, "")  # recorded, so that the test's process gets its environment back
        monkeypatch.delenv(key)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
             "SLURM_JOB_NUM_NODES": "2"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    _export_slurm_ranks()  # a shell of the allocation, not an srun task: a single process
    assert "RANK" not in os.environ
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    _export_slurm_ranks()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "node1" and "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("RANK", "0")  # torchrun inside the SLURM job already set the ranks: left alone
    monkeypatch.setenv("SLURM_PROCID", "2")
    _export_slurm_ranks()
    assert os.environ["RANK"] == "0"


def test_resume_refuses_a_checkpoint_of_the_other_strategy(tmp_path):
    """A sharded checkpoint in the folder and a whole-model resume: one line, not a silent fresh start."""
    import unipelt
    from fsdp_worker import TinyTask, examples, tiny
    from unipelt.train import fit

    folder = tmp_path / "checkpoints" / "last_sharded"
    folder.mkdir(parents=True)
    (folder / "trainer_state.pt").write_bytes(b"written by a sharded run")
    model = unipelt.attach(tiny("bert"), "lora")
    cfg = TrainConfig(resume=True, device="cpu", progress=False, max_steps=1, batch_size=4, save_best=False,
                      max_length=16)
    with pytest.raises(UnipeltError, match="written with trainer.strategy fsdp.*resume it the same way"):
        fit(model, TinyTask("bert", examples("bert")), cfg, tmp_path)


@pytest.mark.slow
def test_cli_fsdp_kill_9_and_resume_equals_uninterrupted(tmp_path):
    """unipelt-train under torchrun with trainer.strategy=fsdp: equals one process with the doubled batch; a sharded
    run killed with SIGKILL (every process) and resumed gives the uninterrupted sharded run's result exactly."""
    model = make_tiny_model(tmp_path / "model", dropout=0.0)
    data = make_small_sst2(tmp_path / "sst2")
    args = tiny_overrides(model, data, "trainer.device=cpu", "trainer.max_train_samples=128", "trainer.epochs=2",
                          "trainer.eval_every=6", "trainer.checkpoint_every=2", "trainer.log_every=1")
    env = {**os.environ, **OFFLINE_ENV}
    sharded = [*args, "trainer.strategy=fsdp", "trainer.batch_size=4"]

    def launch(folder: Path, *extra: str, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(_torchrun(["-m", "unipelt.app.main", *sharded, f"hydra.run.dir={folder}",
                                               *extra]), cwd=tmp_path, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)

    reference = launch(tmp_path / "reference", log=tmp_path / "reference.log")
    victim_dir = tmp_path / "victim"
    victim = launch(victim_dir, log=tmp_path / "victim.log")
    checkpoint = victim_dir / "checkpoints" / "last_sharded"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # the launcher and both ranks (torchrun starts each rank in a session of its own)
    for process in [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    victim.wait()
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert not (victim_dir / "results.jsonl").exists(), "the victim finished before it could be killed"
    run_cli([*args, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    resumed_proc = launch(victim_dir, "trainer.resume=true", log=tmp_path / "resumed.log")
    assert resumed_proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]

    (expected,) = records(tmp_path / "reference" / "results.jsonl")
    (resumed,) = records(victim_dir / "results.jsonl")
    (single,) = records(tmp_path / "single" / "results.jsonl")
    assert expected["world_size"] == 2 and expected["steps"] == single["steps"] == 32
    _close(expected["train_loss"], single["train_loss"], steps=single["steps"])
    _close(expected["metrics"], single["metrics"], steps=single["steps"])
    assert resumed["resumed_from"] and 0 < resumed["resumed_from"] < resumed["steps"] == expected["steps"]
    for key in ("metrics", "score", "best_step", "train_loss", "stopped_early"):
        assert resumed[key] == expected[key], key  # exactly, not approximately
    saved = [load_file(d / "best_adapter" / "adapter_model.safetensors")
             for d in (tmp_path / "reference", victim_dir, tmp_path / "single")]
    assert saved[0].keys() == saved[1].keys() == saved[2].keys()
    assert all(saved[0][k].equal(saved[1][k]) for k in saved[0])
    for name in saved[0]:
        assert_close_trained(saved[0][name], saved[2][name], lr=LR, reason=SPLIT_SUMS, msg=name)
