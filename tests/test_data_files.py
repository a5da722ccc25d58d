"""Local data files are read as their writer meant or refused with one line (issue 12, items 2, 3 and 6): TSV/CSV
quoting (`task.quoting: csv | none`) with every row checked against the header and every line accounted for,
UTF-8 with or without a BOM, fields of any length, finite regression labels, JSON lines with line numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import unipelt
from unipelt.errors import DataError, MethodConfigError
from unipelt.tasks import load_task_config
from unipelt.tasks.sources import load_split

REPO = Path(__file__).resolve().parents[1]
RTE = REPO.parent / "shared" / "data" / "glue" / "rte" / "train.tsv"


def task(tmp_path: Path, **changes):
    base = {"name": "sst2", "kind": "classification", "data_dir": str(tmp_path), "text_columns": ["sentence"],
            "label_column": "label", "label_names": ["negative", "positive"], "metrics": ["accuracy"]}
    return load_task_config({**base, **changes})


def write(tmp_path: Path, text: str | bytes, name: str = "train.tsv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# ---- quoting --------------------------------------------------------------------------------------------------

GLUE_STYLE = 'sentence\tlabel\n"a film\t1\nsecond" row\t0\nplain\t1\n'  # unquoted quotes, as MNLI / QNLI are


def test_an_unquoted_glue_file_read_as_csv_is_refused_naming_the_line_and_the_other_quoting(tmp_path):
    path = write(tmp_path, GLUE_STYLE)
    with pytest.raises(DataError) as info:
        load_split(task(tmp_path), "train")
    message = one_line_error(info)
    assert message.startswith(f"task 'sst2': line 2 of {path} starts a quoted field that runs over lines 2-3 (")
    assert message.endswith("when read as TSV with task.quoting=csv; if the file is written with quoting 'none' (as "
                            "the official GLUE files are), set task.quoting=none")
    write(tmp_path, 'sentence\tlabel\n"a film\t1\nsecond"\t0\nplain\t1\n')  # the quotes close before a tab
    with pytest.raises(DataError, match=r"line 2 of .* starts a quoted field that runs over lines 2-3 when read"):
        load_split(task(tmp_path), "train")


def test_quoting_none_reads_the_glue_file_row_by_row(tmp_path):
    write(tmp_path, GLUE_STYLE)
    raw = load_split(task(tmp_path, quoting="none"), "train")
    assert raw.texts[0] == ['"a film', 'second" row', "plain"] and raw.labels == [1, 0, 1]
    assert raw.row_name(1) == "line 3"


def test_a_sentence_that_starts_with_a_quote_keeps_it_or_is_refused(tmp_path):
    path = write(tmp_path, 'sentence\tlabel\n"Hello" she said\t1\n')
    with pytest.raises(DataError) as info:  # csv would read 'Hello she said' in silence
        load_split(task(tmp_path), "train")
    assert one_line_error(info).startswith(f"task 'sst2': line 2 of {path} has a malformed quoted field (")
    assert "set task.quoting=none" in str(info.value)
    assert load_split(task(tmp_path, quoting="none"), "train").texts[0] == ['"Hello" she said']


def test_a_csv_quoted_file_read_with_quoting_none_is_refused(tmp_path):
    rows = [["sentence", "label"], ['he said "no" twice', "0"], ["fine", "1"]]
    with open(tmp_path / "train.tsv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows(rows)
    with pytest.raises(DataError) as info:
        load_split(task(tmp_path, quoting="none"), "train")
    assert one_line_error(info) == (
        f"task 'sst2': line 2 of {tmp_path / 'train.tsv'} has a field that looks CSV-quoted "
        "('\"he said \"\"no\"\" twice\"') when read as TSV with task.quoting=none; if the file is written with "
        "quoting 'csv' (as Python's csv module and pandas write them), set task.quoting=csv")
    assert load_split(task(tmp_path), "train").texts[0] == ['he said "no" twice', "fine"]


@pytest.mark.parametrize("quoting", ["csv", "none"])
def test_a_row_with_the_wrong_number_of_fields_names_the_line(tmp_path, quoting):
    path = write(tmp_path, "sentence\tlabel\nfine\t1\nan extra\ttab\t0\n")
    with pytest.raises(DataError) as info:
        load_split(task(tmp_path, quoting=quoting), "train")
    assert one_line_error(info).startswith(f"task 'sst2': line 3 of {path} has 3 fields, the header 2 (sentence, "
                                           f"label) when read as TSV with task.quoting={quoting}; ")


def test_the_shared_csv_quoted_rte_file_reads_as_the_csv_module_reads_it(tmp_path):
    cfg = load_task_config({"name": "rte", "kind": "classification", "data_dir": str(RTE.parent),
                            "text_columns": ["sentence1", "sentence2"], "label_column": "label",
                            "label_names": ["entailment", "not_entailment"], "metrics": ["accuracy"]})
    raw = load_split(cfg, "train")
    with open(RTE, newline="", encoding="utf-8") as f:
        expected = list(csv.DictReader(f, delimiter="\t"))
    assert raw.texts[0] == [r["sentence1"] for r in expected] and raw.texts[1] == [r["sentence2"] for r in expected]
    assert any(t.startswith('"') for t in raw.texts[0])  # quoted texts are there, unquoted once


def test_unknown_quoting_is_named(tmp_path):
    with pytest.raises(DataError, match=r"^task 'sst2': quoting: unknown value 'quoted' \(allowed: csv, none\)$"):
        task(tmp_path, quoting="quoted")


# ---- encodings, line endings, sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["train.tsv", "train.jsonl", "train.conll"])
def test_non_utf8_bytes_name_the_file_and_line(tmp_path, name):
    body = {"train.tsv": b"sentence\tlabel\nok\t1\ncaf\xe9\t0\n",
            "train.jsonl": b'{"sentence": "ok", "label": 1}\n{"sentence": "caf\xe9", "label": 0}\n',
            "train.conll": b"EU B-ORG\n\ncaf\xe9 O\n"}[name]
    path = write(tmp_path, body, name)
    cfg = task(tmp_path) if name != "train.conll" else load_task_config(
        {"name": "conll", "kind": "tagging", "data_dir": str(tmp_path), "text_columns": ["tokens"],
         "label_column": "ner_tags", "label_names": ["O", "B-ORG"], "metrics": ["seqeval_f1"]})
    with pytest.raises(DataError) as info:
        load_split(cfg, "train")
    line = 3 if name != "train.jsonl" else 2
    assert one_line_error(info) == (f"task '{cfg.name}': {path} is not UTF-8 text (line {line}: byte b'\\xe9'); "
                                    "save it as UTF-8")


@pytest.mark.parametrize("name", ["train.tsv", "train.csv", "train.jsonl"])
def test_a_utf8_bom_and_crlf_line_ends_are_read(tmp_path, name):
    body = {"train.tsv": "sentence\tlabel\r\nok\t1\r\nbad\t0\r\n", "train.csv": "sentence,label\r\nok,1\r\nbad,0\r\n",
            "train.jsonl": '{"sentence": "ok", "label": 1}\r\n{"sentence": "bad", "label": 0}\r\n'}[name]
    write(tmp_path, "\ufeff" + body, name)
    raw = load_split(task(tmp_path), "train")
    assert raw.texts[0] == ["ok", "bad"] and raw.labels == [1, 0]


@pytest.mark.parametrize("quoting", ["csv", "none"])
def test_a_200k_character_field_is_read_whole(tmp_path, quoting):
    long = "word " * 40_000
    write(tmp_path, f"sentence\tlabel\n{long}\t1\nshort\t0\n")
    assert load_split(task(tmp_path, quoting=quoting), "train").texts[0][0] == long


# ---- values ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, name", [("nan", "train.tsv"), ("inf", "train.tsv"), ("-Infinity", "train.tsv"),
                                         ("NaN", "train.jsonl")])
def test_non_finite_regression_labels_are_refused_naming_the_row(tmp_path, value, name):
    if name == "train.tsv":
        path = write(tmp_path, f"sentence\tlabel\nok\t1.5\nbad\t{value}\n", name)
    else:
        path = write(tmp_path, '{"sentence": "ok", "label": 1.5}\n{"sentence": "bad", "label": NaN}\n', name)
    cfg = task(tmp_path, name="stsb", kind="regression", label_names=None, metrics=["pearson"])
    with pytest.raises(DataError) as info:
        load_split(cfg, "train")
    shown = repr(value) if name == "train.tsv" else "nan"
    assert one_line_error(info) == (f"task 'stsb': label {shown} in column 'label' at line 3 of {path} is not a "
                                    "finite number (regression)".replace("line 3", "line 3" if name == "train.tsv"
                                                                         else "line 2"))


def test_json_lines_errors_name_the_line(tmp_path):
    path = write(tmp_path, '{"sentence": "ok", "label": 1}\n{"sentence": "broken", \n', "train.jsonl")
    with pytest.raises(DataError) as info:
        load_split(task(tmp_path), "train")
    assert one_line_error(info).startswith(f"task 'sst2': line 2 of {path} is not valid JSON (")
    write(tmp_path, '{"sentence": "ok", "label": 1}\n["a list"]\n', "train.jsonl")
    with pytest.raises(DataError, match=r"line 2 of .* is not a JSON object \(got list\)$"):
        load_split(task(tmp_path), "train")
    (tmp_path / "train.jsonl").unlink()
    write(tmp_path, json.dumps([{"sentence": "ok", "label": 1}, {"sentence": "no", "label": 0}]), "train.json")
    raw = load_split(task(tmp_path), "train")
    assert raw.texts[0] == ["ok", "no"] and raw.row_name(1) == "item 2"


# ---- other text files: method and task YAML, adapter JSON ------------------------------------------------------

def test_non_utf8_method_and_task_yaml_are_one_line(tmp_path):
    method = write(tmp_path, b"name: m\n# caf\xe9\nmodules: []\ntrain_base: all\n", "m.yaml")
    with pytest.raises(MethodConfigError) as info:
        unipelt.load_method(method)
    assert one_line_error(info) == f"method file: {method} is not UTF-8 text (line 2: byte b'\\xe9'); save it as UTF-8"
    task_file = write(tmp_path, b"name: t\nkind: classification\n# \xff\n", "t.yaml")
    with pytest.raises(DataError, match=r"^task file: .*t.yaml is not UTF-8 text \(line 3: byte b'\\xff'\)"):
        load_task_config(task_file)
    bom = write(tmp_path, "\ufeffname: m\nmodules: []\ntrain_base: all\n".encode(), "bom.yaml")
    assert unipelt.load_method(bom).train_base == "all"


def test_adapter_json_with_a_bom_loads_and_non_utf8_is_one_line(tmp_path):
    from tiny_models import tiny_model

    unipelt.save_adapter(unipelt.attach(tiny_model("bert"), "lora"), tmp_path / "a")
    meta = tmp_path / "a" / "unipelt_adapter.json"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    unipelt.load_adapter(tiny_model("bert"), tmp_path / "a")
    meta.write_bytes(meta.read_bytes().replace(b'"lora"', b'"lor\xe9"', 1))
    with pytest.raises(unipelt.AdapterFileError, match=r"^load_adapter: .*unipelt_adapter.json is not UTF-8 text "
                                                       r"\(byte \d+\)$"):
        unipelt.load_adapter(tiny_model("bert"), tmp_path / "a")


# ---- found by attacking the readers (issue 12: beyond the list) -------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('{"sentence": "a", "sentence": "b", "label": 1}', r"line 1 of .* has key 'sentence' twice$"),
    ('{"sentence": {"a": 1}, "label": 1}', r"column 'sentence' at line 1 of .* must be text, got \{'a': 1\}$"),
    ('{"sentence": NaN, "label": 1}', r"column 'sentence' at line 1 of .* must be text, got nan$"),
    ('{"sentence": ["a"], "label": 1}', r"column 'sentence' at line 1 of .* must be text, got \['a'\]$"),
])
def test_json_values_that_json_would_take_in_silence_are_refused(tmp_path, line, message):
    write(tmp_path, line + "\n", "train.jsonl")
    with pytest.raises(DataError, match=message):
        load_split(task(tmp_path), "train")


def test_an_empty_json_list_is_an_empty_split(tmp_path):
    path = write(tmp_path, "[]", "train.json")
    with pytest.raises(DataError, match=rf"^task 'sst2': split 'train' in {path} is empty \(no data rows\)$"):
        load_split(task(tmp_path), "train")


def test_a_key_given_twice_in_a_method_or_task_yaml_is_refused(tmp_path):
    method = write(tmp_path, "name: m\nmodules:\n  - form: bottleneck\n    at: ffn\n    insertion: parallel\n"
                             "    compose: add\n    dim: 8\n    dim: 64\n", "m.yaml")
    with pytest.raises(MethodConfigError) as info:
        unipelt.load_method(method)
    assert one_line_error(info) == f"method file {method}: invalid YAML (key 'dim' appears twice (line 8))"
    task_file = write(tmp_path, "name: t\nkind: classification\nkind: regression\n", "t.yaml")
    with pytest.raises(DataError, match=r"invalid YAML \(key 'kind' appears twice \(line 3\)\)$"):
        load_task_config(task_file)
    anchors = write(tmp_path, "common: &c {form: bottleneck, at: ffn}\nname: a\nmodules: []\ntrain_base: all\n"
                              "extra:\n  <<: *c\n  at: attn\n", "a.yaml")
    with pytest.raises(MethodConfigError, match="unknown key 'common'"):  # merge keys may be overridden: no repeat
        unipelt.load_method(anchors)


@pytest.mark.parametrize("key, value, shown", [("layers", [0, 0], "0"), ("at", ["attn.q", "attn.q"], "'attn.q'"),
                                               ("stacks", ["encoder", "encoder"], "'encoder'")])
def test_a_list_with_a_repeated_item_is_refused(key, value, shown):
    """layers: [0, 0] placed two modules under one name; the first, replaced, kept running through its hooks."""
    module = {"form": "bottleneck", "at": "ffn", "insertion": "parallel", "compose": "add", "dim": 2, key: value}
    with pytest.raises(MethodConfigError) as info:
        unipelt.load_method({"name": "x", "modules": [module]})
    assert one_line_error(info) == f"method 'x' module 0: {key}: {shown} is listed twice"
