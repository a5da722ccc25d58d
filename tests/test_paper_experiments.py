"""The paper experiments: the config Hydra composes for each `+experiment=<name>` equals the table of
docs/experiments.md (every setting beside the reference script's value), and a CPU-sized variant of each (tiny random
model saved to a folder, a few fixture rows, a few steps) runs end to end through unipelt-train, generation and
metric included. Nothing is downloaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import unipelt.app.main  # noqa: F401  registers the schemas and the experiments
from app_fixtures import make_small_sst2, make_tiny_model, records, run_cli
from test_paper_settings import PAIRS, mbart_tokenizer
from tiny_tokenizers import word_tokenizer

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "experiments.md"
EXPERIMENTS = ("table2_glue", "table6_xsum", "table6_en_ro")
# What every experiment's table must state (the list: learning rate, length of training, warm-up, batch,
# max length, label smoothing, weight decay, evaluation cadence, checkpoint selection; generation for Table 6).
REQUIRED = {"trainer.lr", "trainer.scheduler", "trainer.epochs", "trainer.max_steps", "trainer.warmup_ratio",
            "trainer.warmup_steps", "trainer.batch_size", "trainer.grad_accum", "trainer.max_length",
            "trainer.label_smoothing", "trainer.weight_decay", "trainer.max_grad_norm", "trainer.adam_beta1",
            "trainer.adam_beta2", "trainer.adam_epsilon", "trainer.eval_every", "trainer.max_eval_samples",
            "trainer.early_stopping_patience", "trainer.save_best", "task.main_metric", "trainer.precision",
            "model.name_or_path", "hydra.sweeper.params.method"}
GENERATION = {"task.num_beams", "task.max_new_tokens", "task.min_new_tokens", "task.no_repeat_ngram_size",
              "task.length_penalty", "task.metrics", "task.max_target_length"}
ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \|")


def doc_tables() -> dict[str, dict[str, str]]:
    """{experiment: {config key: value as written}} from the '## <experiment>' sections of docs/experiments.md."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            tables.setdefault(current, {})
        match = ROW.match(line)
        if match and current is not None:
            tables[current][match.group(1)] = match.group(2)
    return tables


@pytest.fixture(scope="module")
def hydra_module():
    with initialize_config_module(config_module="unipelt.conf", version_base="1.3"):
        yield


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_composed_experiment_equals_the_documented_table(hydra_module, experiment):
    table = doc_tables()[experiment]
    required = REQUIRED | (GENERATION if experiment.startswith("table6") else set())
    assert not required - set(table), f"docs/experiments.md {experiment} lacks rows for {sorted(required - set(table))}"
    cfg = compose("train", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    for key, written in table.items():
        value = OmegaConf.select(cfg, key, default="<missing>")
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        expected = yaml.safe_load(written)
        assert value == expected, f"{experiment}: {key} is {value!r} in the composed config, {expected!r} in the docs"


def test_a_changed_setting_is_caught(hydra_module):
    """The comparison above can fail: an experiment overridden away from its table no longer matches it."""
    cfg = compose("train", overrides=["+experiment=table6_xsum", "trainer.label_smoothing=0.0"])
    assert cfg.trainer.label_smoothing != yaml.safe_load(doc_tables()["table6_xsum"]["trainer.label_smoothing"])


# ---- CPU-sized variants: the experiment file itself, with only the size of the run and the model path changed ----
CPU = ["logger=none", "trainer.precision=fp32", "trainer.progress=false", "trainer.max_steps=3",
       "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.batch_size=4", "trainer.grad_accum=1",
       "trainer.eval_batch_size=4", "trainer.max_train_samples=8", "trainer.max_eval_samples=4"]

DOCUMENTS = [("The council met on Monday. It approved a new park for the town.", "The council approved a new park."),
             ("Two men were arrested after a robbery. Police said both were local.", "Police arrested two local men."),
             ("The team won the final. Fans filled the streets of the town.", "Fans celebrated the team's win."),
             ("Heavy rain closed the main road. Drivers were told to wait.", "Rain closed the town's main road.")]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _finished(out: Path) -> dict:
    (record,) = records(out / "results.jsonl")
    assert record["status"] == "completed", record.get("reason")
    return record


@pytest.mark.slow
def test_table2_glue_cpu_variant(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = make_small_sst2(tmp_path / "sst2", n_train=16, n_eval=8)
    out = tmp_path / "out"
    run_cli(["+experiment=table2_glue", "method=glue/mam", "task=sst2", f"model.name_or_path={model}",
             f"task.data_dir={data}", "method.budget=10%", "trainer.max_length=32", f"hydra.run.dir={out}", *CPU],
            cwd=tmp_path)
    record = _finished(out)
    assert record["lr"] == pytest.approx(1e-4) and 0.0 <= record["metrics"]["validation/accuracy"] <= 1.0
    prefix, adapter = record["method_spec"]["modules"]  # sizes solved for the budget, both modules kept
    assert prefix["length"] >= 1 and adapter["dim"] >= 1


def _save_tiny_seq2seq(config_class, tokenizer, positions: int, model_dir):
    """A 2-layer, 32-wide BART-style model with random weights and `tokenizer`, saved to `model_dir`."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=positions, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, forced_eos_token_id=None)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.mark.slow
def test_table6_xsum_cpu_variant(tmp_path):
    from transformers import BartConfig

    texts = [t for pair in DOCUMENTS for t in pair]
    tokenizer = word_tokenizer("bart", *texts)
    model_dir = _save_tiny_seq2seq(BartConfig, tokenizer, 128, tmp_path / "bart")
    data = tmp_path / "xsum"
    data.mkdir()
    for split in ("train", "validation"):
        _jsonl(data / f"{split}.jsonl", [{"document": d, "summary": s} for d, s in DOCUMENTS])
    out = tmp_path / "out"
    run_cli(["+experiment=table6_xsum", "method=mam", f"model.name_or_path={model_dir}", f"task.data_dir={data}",
             "task.sentence_split=punkt_untrained", "trainer.max_length=64", f"hydra.run.dir={out}", *CPU],
            cwd=tmp_path)
    record = _finished(out)
    assert set(record["metrics"]) == {f"validation/{m}" for m in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    assert record["main_metric"] == "validation/rouge2" and record["lr"] == pytest.approx(5e-5)
    prefix, adapter = record["method_spec"]["modules"]
    assert (prefix["length"], adapter["dim"], adapter["scale"]) == (30, 512, 4.0)  # the script's MAM sizes


@pytest.mark.slow
def test_table6_en_ro_cpu_variant(tmp_path):
    from transformers import MBartConfig

    tokenizer = mbart_tokenizer()
    model_dir = _save_tiny_seq2seq(MBartConfig, tokenizer, 256, tmp_path / "mbart")
    data = tmp_path / "wmt16"
    data.mkdir()
    for split in ("train", "validation"):
        _jsonl(data / f"{split}.jsonl", [{"translation": {"en": en, "ro": ro}} for en, ro in PAIRS])
    out = tmp_path / "out"
    run_cli(["+experiment=table6_en_ro", "method=prefix", f"model.name_or_path={model_dir}", f"task.data_dir={data}",
             f"hydra.run.dir={out}", *CPU], cwd=tmp_path)
    record = _finished(out)
    assert set(record["metrics"]) == {"validation/bleu_ro_moses", "validation/bleu", "validation/loss"}
    assert record["main_metric"] == "validation/loss" and record["greater_is_better"] is False
    assert record["method_spec"]["modules"][0]["length"] == 200  # by_method: the script's prefix baseline size
    assert record["metrics"]["validation/loss"] > 0
