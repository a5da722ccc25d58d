"""Shared helpers of the app / train / report tests: a tiny BERT classifier with a tiny WordPiece tokenizer saved to a
folder (so `model.name_or_path=<folder>` works offline), SST-2 from ../shared/data, and running unipelt-train."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "glue" / "sst2"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1"}  # tiny models run fastest on one thread, and jobs often run two at a time


def make_tiny_model(directory: Path, dropout: float = 0.0, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT for 2-class classification and a WordPiece vocabulary of SST-2's frequent words."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    with open(SST2 / "train.tsv", newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f, dialect="excel-tab")):
            counts.update(row["sentence"].lower().split())
            if i > 3000:
                break
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [w for w, _ in counts.most_common(300) if w not in specials]
    (directory / "vocab.txt").write_text("\n".join(specials + words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(specials) + len(words), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def make_small_sst2(directory: Path, n_train: int = 256, n_eval: int = 64) -> Path:
    """The first rows of SST-2's train and dev files (reading all 67k rows would dominate a tiny job's time)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval)):
        lines = (SST2 / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        (directory / f"{split}.tsv").write_text("".join(lines[: n + 1]), encoding="utf-8")
    return directory


def tiny_overrides(model_dir: Path, data_dir: Path, *extra: str, logger: str = "none") -> list[str]:
    """A tiny, fast job: the tiny model, 64 SST-2 training sentences, 32 dev sentences, no W&B by default."""
    return [f"model.name_or_path={model_dir}", f"task.data_dir={data_dir}", "method=lora", f"logger={logger}",
            "trainer.max_train_samples=64", "trainer.max_eval_samples=32", "trainer.batch_size=8",
            "trainer.max_length=32", "trainer.lr=1e-2", "trainer.progress=false", *extra]


def run_cli(args: list[str], cwd: Path, timeout: float = 600, check: bool = True,
            threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "unipelt.app.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"unipelt-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
