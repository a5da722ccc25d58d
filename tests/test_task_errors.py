"""Bad task configs and bad data: one DataError line naming the culprit, raised before any tokenizing."""

from __future__ import annotations

import json
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny_tokenizers import word_tokenizer  # noqa: E402
from unipelt.errors import DataError, UnipeltError  # noqa: E402
from unipelt.tasks import load_task_config, prepare_task  # noqa: E402


class CountingTokenizer:
    """Wraps a tokenizer and counts calls, to show errors come before any tokenizing."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def tokenizer():
    return CountingTokenizer(word_tokenizer("bart", "good bad fine film the a"))


def sst2(data_dir, **changes) -> dict:
    return {**vars(load_task_config("sst2")), "data_dir": str(data_dir), **changes}


def fails(cfg, tokenizer, pattern: str, model_type: str = "bart") -> str:
    with pytest.raises(DataError) as info:
        prepare_task(cfg, tokenizer, model_type=model_type)
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message
    assert isinstance(info.value, UnipeltError) and isinstance(info.value, ValueError)
    assert getattr(tokenizer, "calls", 0) == 0  # nothing was tokenized
    return message


def write(path, text: str):
    path.write_text(text)
    return path


def test_missing_data_file_names_the_split_and_the_folder(tmp_path, tokenizer):
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\n")
    fails(sst2(tmp_path), tokenizer, rf"no data file for split 'validation' in {re.escape(str(tmp_path))} "
                                      r"\(looked for validation.tsv, validation.csv, validation.jsonl")
    fails(sst2(tmp_path / "nowhere"), tokenizer, r"data_dir .*nowhere \(split 'train'\) does not exist")
    fails(sst2(tmp_path, files={"validation": "dev.tsv"}), tokenizer,
          rf"data file for split 'validation' not found: {re.escape(str(tmp_path / 'dev.tsv'))}")
    write(tmp_path / "validation.tsv", "sentence\tlabel\ngood\t1\n")
    write(tmp_path / "validation.csv", "sentence,label\ngood,1\n")
    fails(sst2(tmp_path), tokenizer, r"split 'validation' has several files .*validation.tsv, validation.csv")


def test_missing_column_is_named_with_the_columns_found(tmp_path, tokenizer):
    write(tmp_path / "train.tsv", "text\tlabel\ngood\t1\n")
    write(tmp_path / "validation.tsv", "sentence\tlabel\ngood\t1\n")
    fails(sst2(tmp_path), tokenizer,
          rf"column 'sentence' not found in {re.escape(str(tmp_path / 'train.tsv'))} \(columns: text, label\)")


def test_label_outside_the_label_set_names_file_row_value_and_allowed(tmp_path, tokenizer):
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nfine\t7\n")
    write(tmp_path / "validation.tsv", "sentence\tlabel\ngood\tpositive\n")
    fails(sst2(tmp_path), tokenizer,
          rf"label '7' in column 'label' at line 4 of {re.escape(str(tmp_path / 'train.tsv'))} is not in the task's "
          r"label set \(allowed: negative, positive, or indices 0-1\)")
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\n")
    write(tmp_path / "validation.jsonl", json.dumps({"sentence": "bad", "label": "neutral"}) + "\n")
    (tmp_path / "validation.tsv").unlink()
    fails(sst2(tmp_path), tokenizer, r"label 'neutral' .* at line 1 of .*validation.jsonl")


def test_empty_data_sets_are_rejected(tmp_path, tokenizer):
    write(tmp_path / "train.tsv", "sentence\tlabel\n")
    write(tmp_path / "validation.tsv", "sentence\tlabel\ngood\t1\n")
    fails(sst2(tmp_path), tokenizer, r"split 'train' in .*train.tsv is empty \(no data rows\)")
    write(tmp_path / "train.tsv", "")
    fails(sst2(tmp_path), tokenizer, r"split 'train' file .*train.tsv is empty")


def test_bad_regression_labels_and_tag_counts(tmp_path, tokenizer):
    write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel\na\tb\t2.5\na\tb\thigh\n")
    write(tmp_path / "validation.tsv", "sentence1\tsentence2\tlabel\na\tb\t1\n")
    stsb = {**vars(load_task_config("stsb")), "data_dir": str(tmp_path)}
    fails(stsb, tokenizer, r"label 'high' in column 'label' at line 3 of .*train.tsv is not a number")
    tmp_path = tmp_path / "tagging"
    tmp_path.mkdir()
    write(tmp_path / "train.conll", "EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn\n")
    conll = {**vars(load_task_config("conll2003")), "data_dir": str(tmp_path), "splits": {"train": "train"}}
    fails(conll, tokenizer, r"line 5 of .*train.conll has a word but no tag: 'Blackburn'", model_type="bert")
    write(tmp_path / "train.conll", "EU B-ORG\nrejects O\n\nPeter B-PEOPLE\n")
    fails(conll, tokenizer, r"label 'B-PEOPLE' .* at sentence 2 \(line 4\) of .*train.conll .*allowed: O, B-PER",
          model_type="bert")
    write(tmp_path / "train.jsonl", json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n")
    (tmp_path / "train.conll").unlink()
    fails(conll, tokenizer, r"line 1 of .*train.jsonl has 2 words but 1 tags", model_type="bert")


def test_translation_rows_missing_a_language(tmp_path, tokenizer):
    rows = [{"translation": {"en": "good", "ro": "bun"}}, {"translation": {"en": "bad", "fr": "mauvais"}}]
    write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    wmt = {**vars(load_task_config("wmt16_en_ro")), "data_dir": str(tmp_path), "splits": {"train": "train"}}
    fails(wmt, tokenizer, r"column 'translation' at line 2 of .*train.jsonl has no 'ro' text")


def test_config_errors_unknown_metric_kind_key(tmp_path, tokenizer):
    base = sst2(tmp_path)
    fails({**base, "metrics": ["bleu"]}, tokenizer,
          r"task 'sst2': unknown metric 'bleu' for kind 'classification' \(allowed: accuracy, f1, f1_macro, "
          r"matthews_correlation\)")
    fails({**base, "kind": "ranking"}, tokenizer,
          r"task 'sst2': unknown kind 'ranking' \(allowed: classification, regression, tagging, summarization, "
          r"translation\)")
    fails({**base, "labels": ["a", "b"]}, tokenizer, r"task: unknown key 'labels' \(allowed: name, kind, hub,")
    fails({**base, "main_metric": "f1"}, tokenizer, r"main_metric 'f1' is not in metrics \(accuracy\)")
    fails({**base, "splits": {"train": "train", "test": "test"}}, tokenizer,
          r"splits: unknown key 'test' \(allowed: train, eval\)")
    fails({**base, "kind": "summarization", "label_names": None, "metrics": ["rouge1"],
           "text_columns": ["sentence"]}, tokenizer, r"kind 'summarization' needs two columns in text_columns")
    yaml_path = write(tmp_path / "mine.yaml", "kind: classification\nhub: x\ntext_colums: [a]\n")
    fails(str(yaml_path), tokenizer, rf"task file {re.escape(str(yaml_path))}: unknown key 'text_colums'")
    fails("sst3", tokenizer, r"unknown task 'sst3' \(allowed: cola, conll2003, mnli,")


def test_model_that_cannot_do_the_task_is_rejected(tmp_path, tokenizer):
    xsum = {**vars(load_task_config("xsum")), "data_dir": str(tmp_path)}
    fails(xsum, tokenizer, r"model type 'bert' is an encoder; generation needs an encoder-decoder", "bert")
    conll = {**vars(load_task_config("conll2003")), "data_dir": str(tmp_path)}
    fails(conll, tokenizer, r"model type 'bart' has no token-classification head")
    fails(sst2(tmp_path), tokenizer, r"unknown model_type 'mystery'", "mystery")
    with pytest.raises(DataError, match="max_train_samples must be a positive integer or None, got 0"):
        prepare_task(sst2(tmp_path), tokenizer, model_type="bert", max_train_samples=0)
