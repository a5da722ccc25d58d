"""Shared helpers of the Hugging Face Trainer / TRL tests: the tiny BERT and SST-2 slice of the loop tests, the
method of each case, TrainingArguments that match a unipelt TrainConfig, and the trainable state of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

import unipelt
from app_fixtures import make_small_sst2, make_tiny_model
from needs import SST2, need_data, need_module
from unipelt import compat
from unipelt.train import TrainConfig, set_seed
from unipelt.train.seeding import epoch_order

# AdaLoRA with a schedule that prunes within a tiny run (t_i = 2, delta_t = 2): over T = 8 steps (t_f = 3) it masks at
# step 4 and fixes the pattern from step 5 on; ADALORA_16, over T = 16 steps (t_f = 9), masks at steps 4 and 6 and
# fixes the pattern from step 7 on.
ADALORA = {"name": "adalora_tiny", "modules": [
    {"form": "svd", "at": ["attn.q", "attn.v", "ffn.up"], "insertion": "parallel", "compose": "scale", "alpha": 8,
     "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "delta_t": 2, "orth_reg_weight": 0.1}]}
ADALORA_16 = {**ADALORA, "modules": [{**ADALORA["modules"][0], "tfinal": 9}]}
METHODS = {"lora": "lora", "mam": "glue/mam", "prefix": "prefix", "prompt_tuning": "prompt_tuning",
           "adalora": ADALORA, "unipelt": "unipelt"}
LR = 1e-2


class Tiny:
    """A 2-layer BERT classifier saved to a folder, 64 SST-2 training sentences and 32 dev sentences."""

    def __init__(self, root: Path, dropout: float = 0.0) -> None:
        need_data(SST2)
        from transformers import AutoTokenizer

        from unipelt.tasks import prepare_task

        self.model_dir = make_tiny_model(root / "model", dropout=dropout)
        data_dir = make_small_sst2(root / "sst2", n_train=64, n_eval=32)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.task = prepare_task({"name": "sst2", "kind": "classification", "data_dir": str(data_dir),
                                  "text_columns": ["sentence"], "label_column": "label",
                                  "label_names": ["neg", "pos"], "metrics": ["accuracy"]}, self.tokenizer,
                                 model_type="bert", max_length=32)

    def base(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=2,
                                                                  **compat.MODEL_LOAD_KWARGS)

    def build(self, method: Any):
        set_seed(0)  # the same adapter initialisation on both sides
        return unipelt.attach(self.base(), method)


def loop_config(**changes: Any) -> TrainConfig:
    """unipelt's loop as the Trainer runs below: linear schedule, 2 warm-up steps, clipping at 1, no decay."""
    base = dict(lr=LR, batch_size=8, epochs=1, warmup_steps=2, warmup_ratio=0.0, max_grad_norm=1.0,
                weight_decay=0.0, scheduler="linear", progress=False, save_best=False, device="cpu", log_every=1,
                checkpoint_minutes=0, max_length=32)
    return TrainConfig(**{**base, **changes})


def trainer_args(output_dir: Path, **changes: Any):
    """TrainingArguments equal to loop_config(): AdamW (torch), the same betas / epsilon / schedule / clipping."""
    from transformers import TrainingArguments

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=LR, warmup_steps=2,
                lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                adam_epsilon=1e-8, optim="adamw_torch", save_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, remove_unused_columns=False, logging_steps=1, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **changes})


class InLoopOrder(IterableDataset):
    """The training examples in the order unipelt's loop visits them (its seeded permutation of each epoch), for a
    Trainer, which takes an iterable dataset as it comes."""

    def __init__(self, data: Dataset, seed: int, epochs: int) -> None:
        self.data, self.seed, self.epochs = data, seed, epochs

    def __iter__(self):
        for epoch in range(self.epochs):
            for index in epoch_order(len(self.data), self.seed, epoch):
                yield self.data[index]


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in compat.unwrap_compiled(model).named_parameters()
            if p.requires_grad}


def svd_deltas(model) -> dict[str, Any]:
    from unipelt.forms.svd.delta import SVDDelta

    return {name: m for name, m in compat.unwrap_compiled(model).named_modules() if isinstance(m, SVDDelta)}


def rank_masks(model) -> dict[str, tuple[list[bool], bool]]:
    return {name: (m.rank_mask.tolist(), m.mask_is_final) for name, m in svd_deltas(model).items()}


def trl():
    return need_module("trl")


__all__ = ["ADALORA", "ADALORA_16", "InLoopOrder", "LR", "METHODS", "Tiny", "loop_config", "rank_masks",
           "svd_deltas", "trainable", "trainer_args", "trl"]
