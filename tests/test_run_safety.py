"""The trainer in-process on a tiny BERT: nothing lost, nothing silently wrong (issue 12, items 3, 4, 6, 8, 9).
A NaN metric is the worst score, an exploding loss stops the run, no message claims a checkpoint that does not
exist, a run folder holds one run (lock; resume compares every result-changing setting with the checkpoint), an
interrupt saves a checkpoint from which the run resumes exactly, checkpoints are written by time by default."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

import unipelt
from app_fixtures import make_small_sst2, make_tiny_model
from unipelt.errors import DataError, MethodConfigError, UnipeltError
from unipelt.train import TrainConfig, TrainingDiverged, TrainingInterrupted, fit, set_seed
from unipelt.train import checkpoint as ckpt
from unipelt.train.config import check
from unipelt.train.distributed import Dist
from unipelt.train.loop import _Loop
from unipelt.train.runfolder import LOCK_NAME, FolderInUse


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from unipelt.tasks import prepare_task

    root = tmp_path_factory.mktemp("safety")
    model_dir, data_dir = make_tiny_model(root / "model"), make_small_sst2(root / "sst2", n_train=64, n_eval=16)
    spec = {"name": "sst2", "kind": "classification", "data_dir": str(data_dir), "text_columns": ["sentence"],
            "label_column": "label", "label_names": ["neg", "pos"], "metrics": ["accuracy"]}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def task(**changes):
        return prepare_task(spec, tokenizer, model_type="bert", **{"max_length": 32, **changes})

    def build(method="lora", dropout=0.0):
        set_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, hidden_dropout_prob=dropout)
        return unipelt.attach(model, method)

    return build, task(), task, tokenizer


def cfg(**changes) -> TrainConfig:
    base = dict(lr=1e-2, batch_size=8, max_length=32, progress=False, save_best=False, device="cpu", log_every=1)
    return TrainConfig(**{**base, **changes})


# ---- values and scores ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["lr", "weight_decay", "max_grad_norm", "warmup_ratio", "checkpoint_minutes",
                                 "divergence_factor"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_trainer_values_are_refused_naming_the_key(key, value):
    with pytest.raises(UnipeltError, match=rf"^trainer.{key} must be a finite number, got {value!r}$"):
        check(replace(TrainConfig(), **{key: value}))


@pytest.mark.parametrize("key, value, message", [
    ("scale", math.nan, "scale must be a finite number or 'learned', got nan"),
    ("scale", math.inf, "scale must be a finite number or 'learned', got inf"),
    ("lr", math.inf, "lr: expected a positive finite number, got inf"),
    ("lr", math.nan, "lr: expected a positive finite number, got nan"),
])
def test_non_finite_method_values_are_refused_naming_the_key(key, value, message):
    module = {"form": "bottleneck", "at": "attn.q", "insertion": "parallel", "compose": "scale", "dim": 2, key: value}
    with pytest.raises(MethodConfigError) as info:
        unipelt.load_method({"name": "bad", "modules": [module]})
    assert str(info.value) == f"method 'bad' module 0: {message}"


@pytest.mark.parametrize("key", ["orth_reg_weight", "tinit", "tfinal"])
def test_non_finite_adalora_values_are_refused(key):
    module = {"form": "svd", "at": "attn.q", "insertion": "parallel", "compose": "scale", key: math.nan}
    with pytest.raises(MethodConfigError, match=rf"^method 'bad' module 0: {key} must be "):
        unipelt.load_method({"name": "bad", "modules": [module]})


def test_a_nan_metric_is_the_worst_score_and_never_pins_the_best(tiny, tmp_path, monkeypatch):
    build, task, _, _ = tiny
    scores = iter([math.nan, 0.5, 0.25])
    monkeypatch.setattr(task, "evaluate", lambda *a, **k: {"accuracy": next(scores)})
    result = fit(build(), task, cfg(max_steps=3, eval_every=1, checkpoint_every=1), tmp_path)
    assert result.best_step == 2 and result.score == 0.5


def test_max_length_must_fit_the_positions_and_leave_room_for_text(tiny, tmp_path):
    build, task, prepare, _ = tiny
    with pytest.raises(UnipeltError, match=r"^trainer.max_length 129 exceeds the 128 positions of model '.*'; set "
                                           r"trainer.max_length<=128$"):
        fit(build(), task, cfg(max_length=129), tmp_path)
    with pytest.raises(DataError, match=r"^prepare_task: max_length 1 leaves no room for text: the tokenizer adds 2 "
                                        r"special tokens to a text; use max_length >= 3$"):
        prepare(max_length=1)
    assert not (tmp_path / "checkpoints").exists()


# ---- divergence -----------------------------------------------------------------------------------------------

def test_an_exploding_loss_stops_the_run_beyond_nan(tiny, tmp_path):
    build, task, _, _ = tiny
    loop = _Loop(build(), task, cfg(max_steps=100), tmp_path, 0, None, Dist())
    for _ in range(10):
        loop.check_divergence(0.7)
        loop.step += 1
    for _ in range(9):
        loop.check_divergence(8342.0)
        loop.step += 1
    expected = (r"^loss exploded at step 20: mean 8342 over the last 10 steps, 1.19e\+04 times the first 10 steps' "
                r"0.7 \(trainer.divergence_factor=10\); stopped \(no checkpoint was written\)$")
    with pytest.raises(TrainingDiverged, match=expected):
        loop.check_divergence(8342.0)
    off = _Loop(build(), task, cfg(max_steps=100, divergence_factor=0), tmp_path, 0, None, Dist())
    for loss in [0.7] * 10 + [8342.0] * 20:
        off.check_divergence(loss)


def test_no_message_claims_a_checkpoint_that_does_not_exist(tiny, tmp_path):
    build, task, _, _ = tiny
    with pytest.raises(TrainingDiverged, match=r"^loss became (nan|inf) at step \d+; stopped \(no checkpoint was "
                                               r"written\)$"):
        fit(build(), task, cfg(lr=1e30, checkpoint_minutes=0), tmp_path / "a")
    assert ckpt.find_checkpoint(tmp_path / "a") is None
    with pytest.raises(TrainingDiverged, match=r"; stopped \(the checkpoint of step \d+ is kept\)$"):
        fit(build(), task, cfg(lr=1e30, checkpoint_every=1), tmp_path / "b")
    assert ckpt.find_checkpoint(tmp_path / "b") is not None


# ---- run folders ----------------------------------------------------------------------------------------------

def test_resume_refuses_every_result_changing_difference_naming_the_key(tiny, tmp_path):
    build, task, prepare, _ = tiny
    fit(build(), task, cfg(max_steps=4, checkpoint_every=2), tmp_path)
    path = tmp_path / "checkpoints" / "last.pt"
    before = path.read_bytes()
    cases = [(cfg(max_steps=4, lr=2e-2, resume=True), task, "trainer.lr", "0.01", "0.02"),
             (cfg(max_steps=4, weight_decay=0.1, resume=True), task, "trainer.weight_decay", "0.0", "0.1"),
             (cfg(max_steps=4, max_length=16, resume=True), task, "trainer.max_length", "32", "16"),
             (cfg(max_steps=4, resume=True), prepare(max_length=16), "data.train", None, None)]
    for config, data, key, old, new in cases:
        with pytest.raises(UnipeltError) as info:
            fit(build(), data, config, tmp_path)
        message = str(info.value)
        assert message.startswith(f"trainer.resume: {key} was "), message
        if old is not None:
            assert f"{key} was {old} in checkpoint {path} but is {new} now; " in message
        assert path.read_bytes() == before  # nothing was written
    with pytest.raises(UnipeltError, match=r"method.modules.0.dim was 8 .* but is 4 now"):
        fit(build({"name": "lora", "modules": [{"form": "bottleneck", "at": ["attn.q", "attn.v"], "dim": 4,
                                                "insertion": "parallel", "compose": "scale", "alpha": 16,
                                                "activation": "none", "init": "lora"}]}),
            task, cfg(max_steps=4, resume=True), tmp_path)
    result = fit(build(), task, cfg(max_steps=4, resume=True, progress=True, log_every=2), tmp_path)  # harmless
    assert result.resumed_from == 4


def test_resume_without_a_checkpoint_and_a_fresh_run_over_one_are_refused(tiny, tmp_path):
    build, task, _, _ = tiny
    with pytest.raises(UnipeltError, match=r"^trainer.resume=true but .*checkpoints/last.pt does not exist; set "
                                           r"trainer.resume=false to start afresh$"):
        fit(build(), task, cfg(max_steps=2, resume=True), tmp_path)
    fit(build(), task, cfg(max_steps=2), tmp_path)
    with pytest.raises(UnipeltError, match=r"already holds a run's checkpoint \(checkpoints/last.pt\); continue it "
                                           r"with trainer.resume=true, or give this run another folder$"):
        fit(build(), task, cfg(max_steps=2), tmp_path)


def test_a_folder_in_use_by_another_process_is_refused(tiny, tmp_path):
    build, task, _, _ = tiny
    # another process holding the folder's lock as unipelt takes it: an flock on <folder>/.unipelt.lock
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        f = open({str(tmp_path / LOCK_NAME)!r}, "a+"); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"pid {{os.getpid()}} on testhost since now"); f.flush(); print("locked", flush=True); time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match=r"^run folder .* is in use by pid \d+ on testhost since now; give each "
                                              r"run its own folder"):
            fit(build(), task, cfg(max_steps=2), tmp_path)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    fit(build(), task, cfg(max_steps=2), tmp_path)  # the kernel dropped the dead holder's lock


# ---- interrupts and checkpoints -------------------------------------------------------------------------------

def test_an_interrupt_saves_a_checkpoint_and_the_resumed_run_is_exact(tiny, tmp_path, monkeypatch):
    build, task, _, _ = tiny
    config = cfg(max_steps=12, eval_every=4, checkpoint_minutes=0, log_every=3, grad_accum=2)
    reference = fit(build(dropout=0.1), task, config, tmp_path / "reference")
    calls = {"n": 0}
    collate = task.collate

    def interrupting(rows):
        calls["n"] += 1
        # steps take two micro-batches each, step 4 ends with an evaluation (one batch): call 13 is step 6's second
        # micro-batch, after its first one drew dropout masks; the checkpoint must hold the RNG of step 5's end
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return collate(rows)

    monkeypatch.setattr(task, "collate", interrupting)
    with pytest.raises(TrainingInterrupted, match=r"^interrupted at step 5/12; checkpoint of step 5 saved to "
                                                  r".*last.pt; continue with trainer.resume=true$"):
        fit(build(dropout=0.1), task, config, tmp_path / "victim")
    monkeypatch.setattr(task, "collate", collate)
    resumed = fit(build(dropout=0.1), task, replace(config, resume=True), tmp_path / "victim")
    assert resumed.resumed_from == 5
    assert (resumed.metrics, resumed.score, resumed.best_step, resumed.train_loss) == \
        (reference.metrics, reference.score, reference.best_step, reference.train_loss)


def test_checkpoints_are_written_by_time_by_default(tiny, tmp_path, monkeypatch):
    build, task, _, _ = tiny
    assert TrainConfig().checkpoint_minutes > 0
    from unipelt.train import loop

    clock = iter(range(0, 10_000, 50))  # 50 s per call: a checkpoint is due every few steps
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    saved = []
    real = ckpt.save_checkpoint
    monkeypatch.setattr(loop.ckpt, "save_checkpoint", lambda d, s: saved.append(s["step"]) or real(d, s))
    fit(build(), task, cfg(max_steps=8), tmp_path)  # one evaluation, at the end
    assert saved[:-1] and saved[-1] == 8  # checkpoints before the only evaluation


@pytest.mark.parametrize("content", [[1, 2], {}, {"trainable": {}}])
def test_a_file_that_is_not_a_training_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "last.pt"
    torch.save(content, path)
    with pytest.raises(UnipeltError, match=rf"^checkpoint {path} is not a unipelt training checkpoint \(no '\w+'\)$"):
        ckpt.load_checkpoint(path)
