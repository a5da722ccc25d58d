"""TRL's SFTTrainer with unipelt.integrations (`unipelt_trainer(SFTTrainer)`) on a tiny Llama: it trains as the plain
UnipeltTrainer does on the same batches (SFT's fused log-probabilities against the model's own cross-entropy),
AdaLoRA's rank pattern included; its checkpoints hold the adapter only; an interrupted SFT run resumes bit for bit.
TRL is a dev extra: without it these tests skip locally and fail in CI (tests/needs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import unipelt
from hf_fixtures import ADALORA_16, rank_masks, trainable, trl
from numerics import assert_close_trained, assert_same
from tiny_models import tiny_model
from tiny_tokenizers import word_tokenizer
from unipelt.integrations import RESUME_FILE

TEXTS = [f"the {a} cat sat on the {b} mat ." for a in ("red", "big", "old", "tiny")
         for b in ("blue", "soft", "flat", "new")] * 4  # 64 sentences: 16 steps of 4
LR = 1e-2
METHODS = {"lora": "lora", "prefix": "prefix", "adalora": ADALORA_16}
# SFTConfig's own defaults differ from TrainingArguments' (bf16 autocast where the device has it, gradient
# checkpointing, ...): the tests train in float32 without checkpointing, with torch's AdamW and clipping at 1
FP32_ADAMW = {"bf16": False, "fp16": False, "gradient_checkpointing": False, "optim": "adamw_torch",
              "max_grad_norm": 1.0}


def _sft(method, out: Path, *, packing=False, stop=None, saves=(), **changes):
    trl_ = trl()
    from datasets import Dataset
    from transformers import TrainerCallback

    from unipelt.integrations import unipelt_trainer

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = control.should_save or state.global_step in saves
            control.should_training_stop = control.should_training_stop or state.global_step == stop

    tokenizer = word_tokenizer("llama", *TEXTS)
    tokenizer.pad_token = tokenizer.eos_token
    model = unipelt.attach(tiny_model("llama", seed=0), method)
    args = trl_.SFTConfig(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=LR,
                          warmup_steps=2, packing=packing, max_length=32,
                          save_strategy="no", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                          seed=0, **{**FP32_ADAMW, **changes})
    trainer = unipelt_trainer(trl_.SFTTrainer)(model=model, args=args, processing_class=tokenizer,
                                               train_dataset=Dataset.from_dict({"text": TEXTS}), callbacks=[SaveAt()])
    return model, trainer


@pytest.mark.parametrize("case", list(METHODS))
def test_sft_trains_as_the_unipelt_trainer_on_the_same_batches(tmp_path, case):
    from unipelt.integrations import UnipeltTrainer

    model, sft = _sft(METHODS[case], tmp_path / "sft")
    assert type(sft).__name__ == "UnipeltSFTTrainer"
    other = unipelt.attach(tiny_model("llama", seed=0), METHODS[case])
    plain = UnipeltTrainer(model=other, args=sft.args, train_dataset=sft.train_dataset,
                           data_collator=sft.data_collator)
    sft.train()
    plain.train()
    expected, actual = trainable(other), trainable(model)
    for name, tensor in expected.items():
        assert_close_trained(actual[name], tensor, lr=LR, msg=name,
                             reason="SFT's loss sums fused per-token log-probabilities; the model's loss is "
                                    "transformers' cross-entropy over the logits")
    assert rank_masks(model) == rank_masks(other)
    if case == "adalora":
        assert any(not all(mask) for mask, _ in rank_masks(model).values())
        assert "unipelt/regularization_loss" in sft.state.log_history[0]


def test_sft_with_packing_trains_lora_and_prefix(tmp_path):
    for method in ("lora", "prefix"):
        model, sft = _sft(method, tmp_path / method, packing=True)
        before = trainable(model)
        sft.train()
        assert any(not (trainable(model)[n] == t).all() for n, t in before.items())


def test_an_interrupted_sft_run_resumes_bit_identical_with_adapter_only_checkpoints(tmp_path):
    full, trainer = _sft(ADALORA_16, tmp_path / "full")
    trainer.train()
    _, cut = _sft(ADALORA_16, tmp_path / "cut", saves=(9,), stop=9)  # in AdaLoRA's final phase (from step 7)
    cut.train()
    checkpoint = tmp_path / "cut" / "checkpoint-9"
    files = {p.name for p in checkpoint.iterdir()}
    assert RESUME_FILE in files and "adapter_model.safetensors" in files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    resumed, again = _sft(ADALORA_16, tmp_path / "cut")
    again.train(resume_from_checkpoint=str(checkpoint))
    for name, tensor in trainable(full).items():
        assert_same(trainable(resumed)[name], tensor, msg=name)
    assert rank_masks(resumed) == rank_masks(full)
