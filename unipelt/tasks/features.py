"""Turning checked rows into model inputs: tokenization per task kind and model architecture, and the
padding collator. Sequences are left unpadded here; `pad_batch` pads each batch to its longest example
(labels with -100, the index every transformers loss ignores)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import Dataset

from .. import compat
from ..errors import DataError
from .config import TaskConfig
from .sources import RawSplit

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ARCHITECTURES = ("encoder", "encoder-decoder", "decoder")


def architecture(model_type: str) -> str:
    """'encoder' (BERT, RoBERTa), 'encoder-decoder' (BART, T5) or 'decoder' (GPT-2, Llama), from the
    transformers model type (config.model_type)."""
    if model_type in compat.model_types_with("seq2seq_lm"):
        return "encoder-decoder"
    if model_type in compat.model_types_with("masked_lm"):  # BERT also has a causal-LM class; it is an encoder
        return "encoder"
    if model_type in compat.model_types_with("causal_lm"):
        return "decoder"
    if model_type in compat.model_types_with("sequence_classification"):
        return "encoder"
    raise DataError(f"unknown model_type '{model_type}' (expected a transformers config.model_type such as "
                    f"bert, roberta, gpt2, llama, bart, t5)")


class FeatureDataset(Dataset):
    """Tokenized examples as a list of feature dicts (lists of ints; a scalar or a list for `labels`)."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer itself, or a copy whose pad token is its EOS token (GPT-2 and Llama tokenizers have no pad
    token); the caller's tokenizer and files are left untouched."""
    if tokenizer.pad_token_id is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; set one")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_batch(features: Sequence[dict[str, Any]], pad_token_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Stack feature dicts into tensors, padding sequences to the longest in the batch on `side`."""
    if not features:
        raise DataError("collate: empty batch")
    batch = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if not isinstance(values[0], (list, tuple)):
            dtype = torch.float32 if isinstance(values[0], float) else torch.long
            batch[key] = torch.tensor(values, dtype=dtype)
            continue
        fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)  # attention/type ids: 0
        width = max(len(v) for v in values)
        rows = []
        for v in values:
            padding = [fill] * (width - len(v))
            rows.append(padding + list(v) if side == "left" else list(v) + padding)
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch


def tokenize(cfg: TaskConfig, raw: RawSplit, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase, arch: str,
             max_length: int) -> tuple[list[dict[str, Any]], list[list[int]] | None]:
    """Features for the rows `indices`; for generation tasks also the prompts that generate() continues."""
    texts = [[column[i] for i in indices] for column in raw.texts]
    labels = None if raw.labels is None else [raw.labels[i] for i in indices]
    if cfg.kind in ("classification", "regression"):
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        keys = list(encoded.keys())
        return [{**{k: encoded[k][n] for k in keys}, "labels": labels[n]} for n in range(len(indices))], None
    if cfg.kind == "tagging":
        return [_tag_features(words, tags, tokenizer, max_length) for words, tags in zip(texts[0], labels)], None
    sources = [cfg.source_prefix + s for s in texts[0]]
    if arch == "encoder-decoder":
        encoded = tokenizer(sources, truncation=True, max_length=max_length)
        targets = tokenizer(text_target=texts[1], truncation=True, max_length=cfg.max_target_length)
        features = [{"input_ids": encoded["input_ids"][n], "attention_mask": encoded["attention_mask"][n],
                     "labels": targets["input_ids"][n]} for n in range(len(indices))]
        return features, [f["input_ids"] for f in features]
    return _decoder_generation(cfg, sources, texts[1], tokenizer, max_length)


def _tag_features(words: list[str], tags: list[int], tokenizer, max_length: int) -> dict[str, Any]:
    """Label each word on its first sub-token, -100 elsewhere. Words are joined with spaces and sub-tokens
    are mapped back to words by character offsets, which works for WordPiece, BPE and SentencePiece alike
    (no `add_prefix_space` needed for RoBERTa/GPT-2). Words cut off by truncation lose their label."""
    spans, text, start = [], "", 0
    for word in words:
        spans.append((start, start + len(word)))
        text += word + " "
        start += len(word) + 1
    if not tokenizer.is_fast:
        raise DataError(f"tagging needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
    encoded = tokenizer(text[:-1], truncation=True, max_length=max_length, return_offsets_mapping=True)
    offsets = encoded.pop("offset_mapping")
    labels, word, last = [], 0, -1
    for begin, end in offsets:
        if end <= begin:  # special tokens have empty spans
            labels.append(IGNORE_INDEX)
            continue
        while word < len(spans) and spans[word][1] <= begin:
            word += 1
        if word < len(spans) and spans[word][0] < end and word != last:
            labels.append(tags[word])
            last = word
        else:
            labels.append(IGNORE_INDEX)
    return {**dict(encoded), "labels": labels}


def _decoder_generation(cfg: TaskConfig, sources: list[str], targets: list[str], tokenizer, max_length: int
                        ) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Decoder-only models learn prompt + target + EOS with the prompt masked out of the loss (-100); the
    source is cut to fit `max_length` while the answer prefix is kept whole."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no EOS token to end generated targets")
    tail = tokenizer(cfg.answer_prefix, add_special_tokens=False)["input_ids"] if cfg.answer_prefix else []
    room = max_length - len(tail)
    if room < 1:
        raise DataError(f"task '{cfg.name}': answer_prefix takes {len(tail)} tokens, more than max_length "
                        f"{max_length}")
    heads = tokenizer(sources, truncation=True, max_length=room)["input_ids"]
    # "TL;DR:" + " The..." keeps BPE word boundaries; a prompt ending in whitespace needs no extra space
    space = "" if cfg.answer_prefix[-1:].isspace() else " "
    answer = tokenizer([space + t for t in targets], add_special_tokens=False, truncation=True,
                       max_length=max(cfg.max_target_length - 1, 1))["input_ids"]
    features, prompts = [], []
    for head, target in zip(heads, answer):
        prompt = list(head) + list(tail)
        sequence = prompt + list(target) + [eos]
        features.append({"input_ids": sequence, "attention_mask": [1] * len(sequence),
                         "labels": [IGNORE_INDEX] * len(prompt) + list(target) + [eos]})
        prompts.append(prompt)
    return features, prompts
