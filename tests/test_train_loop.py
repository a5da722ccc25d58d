"""The training loop in-process on a tiny BERT: the optim contract (per-module lr, on_optimizer_step before the
gradients are cleared), gradient accumulation, early stopping, NaN detection, schedules equal transformers' curves."""

from __future__ import annotations

import pytest
from needs import need_module
import torch

import unipelt
from unipelt import compat
from app_fixtures import make_small_sst2, make_tiny_model
from numerics import assert_close_scaled, assert_close_trained
from unipelt.errors import UnipeltError
from unipelt.train import TrainConfig, TrainingDiverged, fit, set_seed
from unipelt.train.config import SCHEDULES
from unipelt.train.schedules import make_schedule

LORA_WITH_OWN_LR = {"name": "lora2", "modules": [
    {"form": "bottleneck", "name": "q", "at": "attn.q", "insertion": "parallel", "compose": "scale", "scale": 2.0,
     "dim": 4, "activation": "none", "init": "lora", "lr": 0.05},
    {"form": "bottleneck", "name": "v", "at": "attn.v", "insertion": "parallel", "compose": "scale", "scale": 2.0,
     "dim": 4, "activation": "none", "init": "lora"}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from unipelt.tasks import prepare_task

    root = tmp_path_factory.mktemp("loop")
    model_dir, data_dir = make_tiny_model(root / "model"), make_small_sst2(root / "sst2", n_train=64, n_eval=32)
    task = prepare_task({"name": "sst2", "kind": "classification", "data_dir": str(data_dir),
                         "text_columns": ["sentence"], "label_column": "label", "label_names": ["neg", "pos"],
                         "metrics": ["accuracy"]}, AutoTokenizer.from_pretrained(model_dir), model_type="bert",
                        max_length=32)

    def build(method="lora"):
        set_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, **compat.MODEL_LOAD_KWARGS)
        return unipelt.attach(model, method)

    return build, task


def cfg(**changes) -> TrainConfig:
    base = dict(lr=1e-2, batch_size=8, progress=False, save_best=False, device="cpu", log_every=1)
    return TrainConfig(**{**base, **changes})


def test_per_module_lr_and_on_optimizer_step_before_zero_grad(tiny, tmp_path, monkeypatch):
    build, task = tiny
    model = build(LORA_WITH_OWN_LR)
    seen = []
    original = unipelt.optim.on_optimizer_step

    def spy(m, step, total):
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        seen.append((step, total, all(g is not None for g in grads)))
        original(m, step, total)

    monkeypatch.setattr("unipelt.train.loop.optim.on_optimizer_step", spy)
    logged = []
    result = fit(model, task, cfg(lr=1e-3, warmup_ratio=0.0, scheduler="constant"), tmp_path,
                 log=lambda metrics, step: logged.append(metrics))
    assert seen == [(s, 8, True) for s in range(1, 9)]  # 64 examples / 8, every step, gradients still there
    assert result.steps == 8 and 0 <= result.score <= 1
    # the module with its own lr moved with 0.05, the other with the trainer's 1e-3 (Adam: |step| ~ lr)
    q = dict(model.named_parameters())
    q_up = next(p for n, p in q.items() if "unipelt_q" in n and "up" in n)
    v_up = next(p for n, p in q.items() if "unipelt_v" in n and "up" in n)
    assert q_up.abs().max() > 10 * v_up.abs().max() > 0
    assert any("train/loss" in m for m in logged) and any("validation/accuracy" in m for m in logged)


def test_gradient_accumulation_matches_the_full_batch(tiny, tmp_path):
    build, task = tiny
    full, accumulated = build(), build()
    fit(full, task, cfg(batch_size=8), tmp_path / "a")
    fit(accumulated, task, cfg(batch_size=4, grad_accum=2), tmp_path / "b")
    a, b = dict(full.named_parameters()), dict(accumulated.named_parameters())
    # each step: the gradient as one sum over 8 examples against two sums over 4, the loss mean as ÷8 against two
    # halves ÷4 ÷2; AdamW then moves each parameter by its normalised gradient
    for name, param in a.items():
        if param.requires_grad:
            assert_close_trained(b[name], param, lr=cfg().lr, msg=name,
                                 reason="the gradient and the loss mean summed in 2 halves, at every step")


def test_early_stopping_after_patience_evaluations(tiny, tmp_path):
    build, task = tiny
    # a vanishing lr: the score never improves after the first evaluation
    result = fit(build(), task, cfg(lr=1e-12, eval_every=1, early_stopping_patience=2), tmp_path)
    assert result.stopped_early and result.steps == 3 and result.best_step == 1


def test_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(tiny, tmp_path):
    build, task = tiny
    with pytest.raises(TrainingDiverged, match="loss became"):
        fit(build(), task, cfg(lr=1e30, checkpoint_every=1), tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] >= 1 and all(torch.isfinite(t).all() for t in saved["trainable"].values())


def test_gpu_only_settings_are_clear_errors_on_cpu(tiny, tmp_path):
    build, task = tiny
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(UnipeltError, match="precision 'bf16' needs a CUDA device"):
        fit(build(), task, cfg(precision="bf16"), tmp_path)
    with pytest.raises(UnipeltError, match="no CUDA device"):
        fit(build(), task, cfg(device="cuda"), tmp_path)
    with pytest.raises(UnipeltError, match="trainer.scheduler: unknown value 'cosine_restart'"):
        fit(build(), task, cfg(scheduler="cosine_restart"), tmp_path)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_scales_every_group_by_the_same_curve(name):
    # Per-module learning rates (prefix vs adapter) must keep their ratio all along the schedule.
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.03}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    schedule = make_schedule(name, optimizer, 7, 30)
    seen = []
    for _ in range(40):
        first, second = schedule.get_last_lr()
        # float64 Python arithmetic: 0.03·λ against 0.3·(0.1·λ), the constants themselves rounded
        assert_close_scaled(second, 0.3 * first, ops=2, dtype=torch.float64, reason="0.03·λ against 0.3·(0.1·λ)")
        seen.append(first)
        optimizer.step()
        schedule.step()
    if name != "constant":
        assert seen[0] == 0.0 and max(seen) == pytest.approx(0.1)  # warm-up from zero to the peak rate

def test_the_optimizer_the_method_asks_for_is_built(tiny, tmp_path, monkeypatch):
    # QLoRA asks for bitsandbytes' paged 8-bit AdamW (it runs on CPU too); a method that names none gets AdamW.
    bnb = need_module("bitsandbytes")
    from unipelt.train import loop
    from unipelt.train.optimizers import make_optimizer

    build, task = tiny
    built = []
    monkeypatch.setattr(loop, "make_optimizer", lambda *a, **k: built.append(make_optimizer(*a, **k)) or built[-1])
    model = build({**LORA_WITH_OWN_LR, "optimizer": "paged_adamw_8bit"})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit(model, task, cfg(max_steps=2), tmp_path)
    assert type(built[-1]) is bnb.optim.PagedAdamW8bit
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    fit(build(LORA_WITH_OWN_LR), task, cfg(max_steps=1), tmp_path / "plain")
    assert type(built[-1]) is torch.optim.AdamW
    with pytest.raises(UnipeltError, match="method.optimizer: unknown value 'sgd'"):
        make_optimizer("sgd", [], 1e-3)


ADALORA_SHORT = {"name": "adalora_short", "modules": [
    {"form": "svd", "at": ["attn.q", "attn.v", "ffn.up"], "insertion": "parallel", "compose": "scale", "alpha": 8,
     "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 6, "delta_t": 2, "beta1": 0.85, "beta2": 0.85,
     "orth_reg_weight": 0.1}]}


@pytest.mark.parametrize("method", [ADALORA_SHORT, "unipelt"], ids=["adalora", "unipelt"])
def test_interrupt_then_resume_equals_the_uninterrupted_run(tiny, tmp_path, method):
    """A method's own training state (AdaLoRA's importance averages, its rank masks and budget) travels with the
    checkpoint: resuming mid-schedule gives bit-identical adapters, not a run whose allocator starts over."""
    build, task = tiny
    run = cfg(epochs=3, batch_size=8, checkpoint_every=1, eval_every=0)  # 24 steps; masking from step 4 to 18
    reference = build(method)
    expected = fit(reference, task, run, tmp_path / "reference")

    def stop_at(step: int):
        def log(metrics, at):
            if at == step and "train/loss" in metrics:
                raise KeyboardInterrupt
        return log

    victim_dir = tmp_path / "victim"
    for stop in (7, 19):  # inside the masking phase, then inside the final phase (pattern fixed)
        with pytest.raises(unipelt.train.TrainingInterrupted):
            fit(build(method), task, TrainConfig(**{**run.__dict__, "resume": stop == 19}), victim_dir,
                log=stop_at(stop))
    resumed_model = build(method)
    resumed = fit(resumed_model, task, TrainConfig(**{**run.__dict__, "resume": True}), victim_dir)
    assert resumed.resumed_from == 18 and resumed.steps == expected.steps == 24
    assert resumed.metrics == expected.metrics and resumed.train_loss == expected.train_loss
    want = dict(reference.named_parameters())
    for name, param in resumed_model.named_parameters():
        assert param.equal(want[name]), name
    want_buffers = dict(reference.named_buffers())
    for name, buffer in resumed_model.named_buffers():
        assert buffer.equal(want_buffers[name]), name


def test_a_checkpoint_without_the_allocator_state_is_refused(tiny, tmp_path):
    build, task = tiny
    run = cfg(epochs=1, checkpoint_every=1)
    fit(build(ADALORA_SHORT), task, run, tmp_path)
    path = tmp_path / "checkpoints" / "last.pt"
    saved = torch.load(path, weights_only=False)
    assert list(saved["method_state"]) == ["unipelt_m0_rank_allocator"]  # AdaLoRA's one controller
    saved.pop("method_state")  # as an older unipelt wrote it
    torch.save(saved, path)
    with pytest.raises(UnipeltError, match="holds no training state for .*older unipelt"):
        fit(build(ADALORA_SHORT), task, TrainConfig(**{**run.__dict__, "resume": True}), tmp_path)
