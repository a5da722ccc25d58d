"""Run by tests/test_train_fsdp.py under `torchrun --nproc_per_node=2`: for each tiny family and preset, unipelt's
fit() with trainer.strategy=fsdp over both ranks (batch 4 each), and on rank 0 the same run in one process with
batch 8. Writes one JSON report: per-step losses, final metrics, where saved adapters are, AdaLoRA's masks and
importance scores as every rank holds them. One process group for all runs keeps the test to one launch.

usage: fsdp_worker.py OUT_DIR FAMILY:PRESET[,PRESET...] [FAMILY:...]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import unipelt  # noqa: E402
from numerics import threads_from_env  # noqa: E402
from tiny_models import ENCODER_DECODERS, VOCAB, tiny_model  # noqa: E402
from unipelt.attach import state_of  # noqa: E402
from unipelt.train import TrainConfig, fit, set_seed  # noqa: E402
from unipelt.train.distributed import Dist, setup  # noqa: E402

torch.set_num_threads(threads_from_env())  # per process, as the suite (tests/conftest.py)
N_TRAIN, LENGTH, STEPS = 32, 8, 3
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                "activation_dropout", "classifier_dropout", "mlp_dropout", "dropout_rate", "attn_pdrop", "resid_pdrop",
                "embd_pdrop")


def tiny(family: str) -> nn.Module:
    """A tiny model with every dropout off: the sharded and the single run must draw no random masks."""
    return tiny_model(family, **{key: 0.0 for key in DROPOUT_KEYS})


def examples(family: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(N_TRAIN):
        ids = torch.randint(3, VOCAB, (LENGTH,), generator=g)
        mask = torch.ones(LENGTH, dtype=torch.long)
        mask[LENGTH - (i % 3):] = 0  # some padding (attended around, but every label counts: a token-mean loss
        # over equal counts per example is the same whether one process or two average it)
        item = {"input_ids": ids, "attention_mask": mask}
        if family in ENCODER_DECODERS:
            item["labels"] = torch.randint(3, VOCAB, (4,), generator=g)
        elif family in ("bert", "roberta"):
            item["labels"] = torch.tensor(i % 2)
        else:
            item["labels"] = ids
        out.append(item)
    return out


@dataclass
class TinyTask:
    """The PreparedTask interface the loop uses: mean loss on a held-out split, and for generative families a
    greedy generation (a sharded generate() calls the encoder and the head outside the root's forward)."""

    family: str
    train: list
    name: str = "tiny"
    main_metric: str = "loss"
    greater_is_better: bool = False

    @property
    def eval_splits(self) -> dict[str, list]:
        return {"validation": self.train[:8]}

    @staticmethod
    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def evaluate(self, model, split, *, batch_size=64, device=None, max_new_tokens=None) -> dict[str, float]:
        batch = self.collate(self.eval_splits[split])
        metrics = {"loss": float(model(**batch).loss)}
        if hasattr(model, "generate"):  # decoders and encoder-decoders
            generated = model.generate(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2],
                                       max_new_tokens=3, do_sample=False)
            metrics["generated_sum"] = float(generated.sum())
        return metrics


def method(preset: str):
    """A preset by name; `qlora_adamw`: QLoRA's 4-bit base with torch's AdamW (bitsandbytes' optimizers do not
    take sharded parameters, see unipelt/train/sharding.py); `learned_scale`: adapters with learned scalars."""
    if preset == "qlora_adamw":
        return {**unipelt.load_method("qlora").to_dict(), "optimizer": "adamw", "name": "qlora_adamw"}
    if preset == "learned_scale":  # a 0-dim trainable scalar per slot (FSDP shards tensors along dim 0)
        return {"name": preset, "modules": [{"form": "bottleneck", "at": ["ffn", "attn.v"], "insertion": "parallel",
                                             "compose": "scale", "scale": "learned", "dim": 4}]}
    return preset


def run(family: str, preset: str, out: Path, info: Dist) -> dict:
    set_seed(0)
    model = tiny(family)
    beside = preset.startswith("beside_lora_")  # a frozen LoRA "frozen" beside the trained adapter
    if beside:
        unipelt.attach(model, "lora", name="frozen")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "unipelt_frozen__" in name:
                    param.add_(0.1)
        preset = preset[len("beside_lora_"):]
    unipelt.attach(model, method(preset))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "unipelt_frozen__" in n}
    for module in model.modules():  # adapter dropout too (lora/qlora presets)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    losses: list[float] = []

    def log(metrics: dict, step: int) -> None:
        if "train/loss" in metrics:
            losses.append(metrics["train/loss"])

    # BART: the sharded run accumulates two micro-batches per step (no reduce-scatter on the first)
    accum = 2 if family in ENCODER_DECODERS and info.enabled else 1
    # a small clipping norm, so that clipping acts: the norm must be the whole gradient's, over every shard
    cfg = TrainConfig(lr=1e-2, batch_size=8 // info.world_size // accum, grad_accum=accum, max_steps=STEPS,
                      eval_every=STEPS, log_every=1, progress=False, device="cpu", strategy="fsdp", warmup_steps=1,
                      max_grad_norm=0.05, max_length=16)
    folder = out / f"{family}-{preset}-{info.world_size}"
    result = fit(model, TinyTask(family, examples(family)), cfg, folder, seed=0, log=log, info=info)
    report = {"losses": losses, "metrics": result.metrics, "adapter": str(folder / "best_adapter")}
    if beside:  # what training the other adapter did to the frozen one (gathered: its shards are everywhere)
        from torch.distributed.tensor import DTensor
        now = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()
               if "unipelt_frozen__" in n}
        report["frozen_change"] = max(float((now[n] - (t.full_tensor() if isinstance(t, DTensor) else t)).abs().max())
                                      for n, t in frozen.items())
        report["frozen_count"] = len(now)
    allocators = [c for c in state_of(model).controllers.values() if hasattr(c, "triplet_scores")]
    if allocators:
        masks = torch.cat([f.rank_mask.float() for a in allocators for f in a.forms.values()])
        scores = torch.cat([a.triplet_scores(f) for a in allocators for f in a.forms.values()])
        report["rank_mask"], report["scores"] = masks.tolist(), scores.tolist()
        if info.enabled:  # what every rank holds, to check they agree
            gathered: list = [None] * info.world_size
            dist.all_gather_object(gathered, (masks.tolist(), scores.tolist()))
            report["per_rank"] = gathered
    return report


def main() -> None:
    out = Path(sys.argv[1])
    jobs = [(family, preset) for arg in sys.argv[2:] for family, _, presets in [arg.partition(":")]
            for preset in presets.split(",")]
    info = setup("cpu")
    report: dict[str, dict] = {}
    for family, preset in jobs:
        # an error propagates: torchrun then ends the other rank, which would otherwise wait in a collective
        sharded = run(family, preset, out, info)
        single = run(family, preset, out, Dist()) if info.is_main else None
        report[f"{family}:{preset}"] = {"fsdp": sharded, "single": single}
        dist.barrier()
    if info.is_main:
        (out / "report.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
