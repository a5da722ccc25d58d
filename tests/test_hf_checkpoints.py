"""Checkpoints of the Hugging Face Trainer with unipelt.integrations: an interrupted run resumed from its checkpoint
ends bit for bit where the uninterrupted run ends (dropout on, AdaLoRA resumed mid-schedule and in its final phase);
checkpoints and save_model hold the adapter only, and load for inference with unipelt.load_adapter (and PEFT);
the best checkpoint comes back at the end; a plain Trainer with UnipeltCallback carries AdaLoRA's state too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unipelt
from hf_fixtures import ADALORA_16, Tiny, rank_masks, trainable, trainer_args
from needs import need_module
from numerics import assert_close_scaled, assert_same
from unipelt.integrations import PEFT_DIR, RESUME_FILE

SAVES = (5, 9)  # mid-schedule (AdaLoRA masks at 4 and 6) and in the final phase (from step 7 of 16)
ADAPTER_FILES = {"adapter_model.safetensors", "unipelt_adapter.json"}
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("hfck"), dropout=0.1)


def _callback(saves=SAVES, stop=None):
    from transformers import TrainerCallback

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in saves:
                control.should_save = True
            if state.global_step == stop:
                control.should_training_stop = True

    return SaveAt()


def _run(tiny, method, out: Path, *, resume=None, stop=None, plain=False, **changes):
    """16 steps of 4 examples, the Trainer's own shuffling; saves at SAVES; `stop`: interrupted after that step."""
    from transformers import Trainer

    from unipelt.integrations import UnipeltCallback, UnipeltTrainer

    model = tiny.build(method)
    args = trainer_args(out, per_device_train_batch_size=4, num_train_epochs=1, **changes)
    callbacks = [_callback(stop=stop)] + ([UnipeltCallback()] if plain else [])
    cls = Trainer if plain else UnipeltTrainer
    trainer = cls(model=model, args=args, train_dataset=tiny.task.train, data_collator=tiny.task.collate,
                  eval_dataset=tiny.task.eval_splits["validation"], processing_class=tiny.tokenizer,
                  callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model, trainer


def _assert_same_training(actual, expected):
    a, e = trainable(actual), trainable(expected)
    assert a.keys() == e.keys()
    for name in e:
        assert_same(a[name], e[name], msg=name)
    assert rank_masks(actual) == rank_masks(expected)
    sa, se = unipelt.optim.training_state(actual), unipelt.optim.training_state(expected)
    assert json.dumps(sa, default=lambda t: t.tolist()) == json.dumps(se, default=lambda t: t.tolist())


@pytest.mark.parametrize("case", ["adalora", "prefix"])
def test_an_interrupted_run_resumed_from_its_checkpoint_ends_bit_identical(tiny, tmp_path, case):
    method = ADALORA_16 if case == "adalora" else "prefix"
    full, _ = _run(tiny, method, tmp_path / "full")
    _run(tiny, method, tmp_path / "cut", stop=SAVES[0])
    assert not (tmp_path / "cut" / f"checkpoint-{SAVES[1]}").exists()
    resumed, _ = _run(tiny, method, tmp_path / "cut", resume=tmp_path / "cut" / f"checkpoint-{SAVES[0]}")
    _assert_same_training(resumed, full)
    if case == "adalora":  # in the final phase the rank pattern is fixed: a resume must keep it, not rescore it
        assert any(not all(mask) for mask, final in rank_masks(full).values())
        late, _ = _run(tiny, method, tmp_path / "late", resume=tmp_path / "full" / f"checkpoint-{SAVES[1]}")
        _assert_same_training(late, full)


def _tensor_counts(folder: Path) -> dict[str, int]:
    """Elements of every tensor file in a folder (the Trainer's RNG states and arguments hold no model tensors)."""
    counts = {}
    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            counts[str(path.relative_to(folder))] = sum(t.numel() for t in load_file(str(path)).values())
        elif path.name in ("optimizer.pt", RESUME_FILE):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            counts[str(path.relative_to(folder))] = sum(t.numel() for t in _tensors(saved))
    return counts


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_checkpoints_and_save_model_hold_the_adapter_only_and_load_for_inference(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, trainer = _run(tiny, "lora", tmp_path / "run", max_steps=SAVES[0])
    trainer.save_model(str(tmp_path / "final"))
    adapter_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_numel = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    assert adapter_numel * 10 < base_numel
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVES[0]}"
    for folder, extra in ((checkpoint, TRAINER_FILES | {RESUME_FILE}), (tmp_path / "final", {"training_args.bin"})):
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        tokenizer = {f for f in files if f.startswith(("tokenizer", "vocab", "special_tokens"))}
        assert tokenizer and files - tokenizer == ADAPTER_FILES | extra | {f"{PEFT_DIR}/adapter_config.json",
                                                                         f"{PEFT_DIR}/adapter_model.safetensors"}
        counts = _tensor_counts(folder)
        # adapter-only: each tensor file holds the trained tensors (the optimizer: two moments and a step count of
        # each), no base weight
        steps = sum(1 for p in model.parameters() if p.requires_grad)
        assert counts and all(n <= 2 * adapter_numel + steps for n in counts.values()), counts
        # a checkpoint is not a model folder: from_pretrained refuses it, instead of returning the base model
        with pytest.raises((OSError, ValueError)):
            AutoModelForSequenceClassification.from_pretrained(folder)
    batch = tiny.task.collate([tiny.task.train[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        for folder in (checkpoint, tmp_path / "final"):
            assert_same(unipelt.load_adapter(tiny.base(), folder).eval()(**batch).logits, expected)
        peft = need_module("peft")
        theirs = peft.PeftModel.from_pretrained(tiny.base(), str(checkpoint / PEFT_DIR)).eval()
        assert_close_scaled(theirs(**batch).logits, expected, ops=2 * tiny.base().config.num_hidden_layers,
                            reason="PEFT computes each LoRA (at q and v of each layer) as its own B(A·x)")


def test_the_best_checkpoint_comes_back_at_the_end(tiny, tmp_path):
    model, trainer = _run(tiny, ADALORA_16, tmp_path, eval_strategy="steps", eval_steps=5, save_strategy="steps",
                          save_steps=5, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    best = Path(trainer.state.best_model_checkpoint)
    saved = torch.load(best / RESUME_FILE, map_location="cpu", weights_only=True)
    for name, tensor in saved["trainable"].items():
        assert_same(trainable(model)[name], tensor, msg=name)


def test_a_plain_trainer_with_the_callback_resumes_adalora_bit_identical(tiny, tmp_path):
    """A plain Trainer writes the whole model; UnipeltCallback adds the training state beside it."""
    full, _ = _run(tiny, ADALORA_16, tmp_path / "full", plain=True)
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVES[1]}"
    assert (checkpoint / RESUME_FILE).is_file() and (checkpoint / "model.safetensors").is_file()
    late, _ = _run(tiny, ADALORA_16, tmp_path / "full", resume=checkpoint, plain=True)
    _assert_same_training(late, full)
    os.remove(checkpoint / RESUME_FILE)
    with pytest.raises(unipelt.UnipeltError, match=rf"resuming at step {SAVES[1]}, but .*checkpoint-{SAVES[1]} holds "
                                                   "no unipelt_resume.pt"):
        _run(tiny, ADALORA_16, tmp_path / "full", resume=checkpoint, plain=True)


def test_a_resume_with_another_method_is_refused_naming_the_difference(tiny, tmp_path):
    _run(tiny, ADALORA_16, tmp_path, stop=SAVES[0])
    other = {**ADALORA_16, "modules": [{**ADALORA_16["modules"][0], "target_r": 3}]}
    with pytest.raises(unipelt.UnipeltError, match=r"written for another method than the attached 'adalora_tiny' "
                                                   r"\(method\.modules\[0\]\.target_r: 2 there, 3 here\)"):
        _run(tiny, other, tmp_path, resume=tmp_path / f"checkpoint-{SAVES[0]}")
