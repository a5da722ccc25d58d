"""prepare_task: a task config plus a tokenizer become tokenized train/eval sets, a collator, the model class
and its keyword arguments, and an `evaluate` that computes the task's official metrics (forward pass for
classification, regression and tagging; `generate()` for summarization and translation)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch.utils.data import Dataset

from .. import compat
from ..errors import DataError, allowed
from .config import GENERATION_KINDS, TaskConfig, load_task_config
from .features import IGNORE_INDEX, FeatureDataset, architecture, pad_batch, tokenize, with_pad_token
from .languages import with_languages
from .losses import token_cross_entropy
from .metrics import check_sentence_split, compute_metrics, greater_is_better
from .sources import RawSplit, load_split

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EVAL_SUBSET_SEED = 0  # evaluation subsets do not depend on the run's seed: every run scores the same examples


@dataclass
class PreparedTask:
    name: str
    kind: str
    num_labels: int  # classes (classification, tagging), 1 (regression), 0 (generation)
    label_names: list[str] | None
    train: Dataset | None  # None for an evaluation-only task (splits.train: null)
    eval_splits: dict[str, Dataset]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    main_metric: str
    greater_is_better: bool
    metrics: list[str]
    config: TaskConfig
    tokenizer: Any  # the tokenizer the features were made with (a copy with pad = EOS where it had no pad)
    model_type: str
    architecture: str  # encoder | encoder-decoder | decoder
    _prompts: dict[str, list[list[int]]] = field(default_factory=dict, repr=False)  # generation inputs
    _references: dict[str, list[str]] = field(default_factory=dict, repr=False)  # generation targets
    # how generate() starts in the target language: {"decoder_start_token_id": code} or {"forced_bos_token_id": code}
    language_start: dict[str, int] = field(default_factory=dict)

    @property
    def is_generation(self) -> bool:
        return self.kind in GENERATION_KINDS

    def auto_model_class(self) -> type:
        import transformers

        if self.kind in ("classification", "regression"):
            return transformers.AutoModelForSequenceClassification
        if self.kind == "tagging":
            return transformers.AutoModelForTokenClassification
        if self.architecture == "encoder-decoder":
            return transformers.AutoModelForSeq2SeqLM
        return transformers.AutoModelForCausalLM

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `auto_model_class().from_pretrained(...)` (they override the model config)."""
        kwargs: dict[str, Any] = {}
        if self.kind == "regression":
            kwargs.update(num_labels=1, problem_type="regression")
        elif self.label_names is not None:
            kwargs.update(num_labels=self.num_labels, id2label=dict(enumerate(self.label_names)),
                          label2id={name: i for i, name in enumerate(self.label_names)})
            if self.kind == "classification":
                kwargs["problem_type"] = "single_label_classification"
        if self.architecture == "decoder":  # GPT-2/Llama configs have no pad token; the heads need it
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        return kwargs

    def evaluate(self, model: torch.nn.Module, split: str, *, batch_size: int = 64, device: Any = None,
                 max_new_tokens: int | None = None) -> dict[str, float]:
        """The task's metrics on one eval split: {metric: value}. The model's train/eval mode is restored."""
        if split not in self.eval_splits:
            raise DataError(f"task '{self.name}': unknown eval split '{split}' (allowed: {allowed(self.eval_splits)})")
        if batch_size <= 0:
            raise DataError(f"evaluate: batch_size must be positive, got {batch_size}")
        if device is None:
            device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        names = [m for m in self.metrics if m != "loss"]
        out: dict[str, float] = {}
        try:
            with torch.no_grad():
                if self.is_generation:
                    predictions, references = self._generate(model, split, batch_size, device, max_new_tokens)
                else:
                    predictions, references = self._predict(model, split, batch_size, device)
                if "loss" in self.metrics:
                    out["loss"] = self._loss(model, split, batch_size, device)
        finally:
            model.train(was_training)
        out.update(compute_metrics(names, predictions, references, sentence_split=self.config.sentence_split))
        return {m: out[m] for m in self.metrics}

    def _loss(self, model, split: str, batch_size: int, device) -> float:
        """Mean token cross-entropy of the references under teacher forcing (no label smoothing)."""
        data = self.eval_splits[split]
        causal = self.architecture == "decoder"  # a decoder-only LM: position t predicts label t + 1
        total, tokens = 0.0, 0
        for start in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in
                     self.collate([data[i] for i in range(start, min(start + batch_size, len(data)))]).items()}
            labels = batch["labels"]
            logits = model(**batch).logits
            total += float(token_cross_entropy(logits, labels, causal=causal, reduction="sum"))
            tokens += int(((labels[:, 1:] if causal else labels) != IGNORE_INDEX).sum())
        return total / max(tokens, 1)

    def generation_kwargs(self, max_new_tokens: int | None = None) -> dict[str, Any]:
        """What `evaluate` passes to model.generate(): the task's beam search settings and language code."""
        cfg, tokenizer = self.config, self.tokenizer
        return dict(max_new_tokens=max_new_tokens or cfg.max_new_tokens or cfg.max_target_length,
                    min_new_tokens=cfg.min_new_tokens, num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                    no_repeat_ngram_size=cfg.no_repeat_ngram_size, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **self.language_start)

    def _predict(self, model, split: str, batch_size: int, device) -> tuple[list, list]:
        data = self.eval_splits[split]
        predictions: list = []
        references: list = []
        for start in range(0, len(data), batch_size):
            batch = self.collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            if self.kind == "regression":
                predictions += logits.reshape(len(labels), -1)[:, 0].tolist()
                references += labels.tolist()
            elif self.kind == "classification":
                predictions += logits.argmax(-1).tolist()
                references += labels.tolist()
            else:  # tagging: compare tag names on the labelled (first) sub-tokens only
                names = self.label_names
                for row_logits, row_labels in zip(logits.argmax(-1), labels):
                    keep = row_labels != IGNORE_INDEX
                    predictions.append([names[i] for i in row_logits[keep].tolist()])
                    references.append([names[i] for i in row_labels[keep].tolist()])
        return predictions, references

    def _generate(self, model, split: str, batch_size: int, device, max_new_tokens: int | None
                  ) -> tuple[list[str], list[str]]:
        prompts = self._prompts[split]
        tokenizer = self.tokenizer
        decoder = self.architecture == "decoder"
        settings = self.generation_kwargs(max_new_tokens)
        predictions: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [{"input_ids": p, "attention_mask": [1] * len(p)} for p in prompts[start:start + batch_size]]
            # decoder-only models continue the prompt, so prompts are padded on the left
            batch = {k: v.to(device) for k, v in pad_batch(chunk, tokenizer.pad_token_id,
                                                           "left" if decoder else "right").items()}
            output = model.generate(**batch, **settings)
            if decoder:
                output = output[:, batch["input_ids"].shape[1]:]
            predictions += [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
        return predictions, self._references[split]


def prepare_task(cfg: TaskConfig | Mapping | Any, tokenizer: PreTrainedTokenizerBase, *, model_type: str,
                 max_length: int = 128, max_train_samples: int | None = None, max_eval_samples: int | None = None,
                 seed: int = 0) -> PreparedTask:
    """Load, check and tokenize a task. `cfg`: a TaskConfig, dict, DictConfig, shipped task name or YAML path.
    Every split is read and checked before anything is tokenized; all problems raise DataError."""
    task = load_task_config(cfg)
    for key, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples),
                       ("max_length", max_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise DataError(f"prepare_task: {key} must be a positive integer or None, got {value!r}")
    arch = architecture(model_type)
    _check_model_fits(task, model_type, arch)
    tokenizer = with_pad_token(tokenizer)
    tokenizer, language_start = with_languages(task, tokenizer)
    if "rougeLsum" in task.metrics:
        check_sentence_split(task.sentence_split)
    pair = len(task.text_columns) == 2 and task.kind in ("classification", "regression")
    reserved = tokenizer.num_special_tokens_to_add(pair=pair)
    needed = reserved + (2 if pair else 1)  # one token of each text at least
    if max_length < needed:  # the tokenizer would ignore the limit (it cannot cut its special tokens) or keep no text
        raise DataError(f"prepare_task: max_length {max_length} leaves no room for text: the tokenizer adds "
                        f"{reserved} special tokens to {'a sentence pair' if pair else 'a text'}; use max_length >= "
                        f"{needed}")

    train_raw = load_split(task, task.splits["train"]) if task.splits["train"] else None
    eval_raw = {split: load_split(task, split) for split in task.splits["eval"]}

    train = None
    if train_raw is not None:
        indices = _subset(len(train_raw), max_train_samples, seed)
        train = FeatureDataset(tokenize(task, train_raw, indices, tokenizer, arch, max_length)[0])
    eval_splits: dict[str, Dataset] = {}
    prompts: dict[str, list[list[int]]] = {}
    references: dict[str, list[str]] = {}
    for split, raw in eval_raw.items():
        indices = _subset(len(raw), max_eval_samples, EVAL_SUBSET_SEED)
        features, split_prompts = tokenize(task, raw, indices, tokenizer, arch, max_length)
        eval_splits[split] = FeatureDataset(features)
        if split_prompts is not None:
            prompts[split] = split_prompts
            references[split] = [raw.texts[1][i] for i in indices]

    return PreparedTask(
        name=task.name, kind=task.kind, num_labels=_num_labels(task), label_names=task.label_names,
        train=train, eval_splits=eval_splits, collate=partial(pad_batch, pad_token_id=tokenizer.pad_token_id),
        main_metric=task.main_metric, greater_is_better=greater_is_better(task.main_metric),
        metrics=list(task.metrics), config=task, tokenizer=tokenizer, model_type=model_type, architecture=arch,
        _prompts=prompts, _references=references, language_start=language_start,
    )


def _check_model_fits(task: TaskConfig, model_type: str, arch: str) -> None:
    where = f"task '{task.name}' ({task.kind})"
    if task.kind in GENERATION_KINDS and arch == "encoder":
        raise DataError(f"{where}: model type '{model_type}' is an encoder; generation needs an "
                        f"encoder-decoder (bart, t5) or decoder (gpt2, llama) model")
    if task.kind == "tagging" and model_type not in compat.model_types_with("token_classification"):
        raise DataError(f"{where}: model type '{model_type}' has no token-classification head "
                        f"(AutoModelForTokenClassification)")
    if task.kind in ("classification", "regression") and \
            model_type not in compat.model_types_with("sequence_classification"):
        raise DataError(f"{where}: model type '{model_type}' has no sequence-classification head "
                        f"(AutoModelForSequenceClassification)")


def _subset(size: int, limit: int | None, seed: int) -> list[int]:
    """All row indices, or `limit` of them drawn with `seed` (kept in file order)."""
    if limit is None or limit >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), limit))


def _num_labels(task: TaskConfig) -> int:
    if task.kind == "regression":
        return 1
    return len(task.label_names) if task.label_names else 0


__all__ = ["PreparedTask", "prepare_task", "RawSplit"]
