"""Per-rank memory of LoRA training under trainer.strategy ddp vs fsdp, with 1 and 2 processes.

Each configuration is one `torchrun` launch of this file (worker mode); the driver prints one table. Per rank:
- `params MB`: bytes of the parameters the rank holds after wrapping (a DTensor counts its local shard only),
  frozen base included: DDP keeps a whole copy on every rank, FSDP divides it by the number of ranks;
- `adapter state MB`: trainable parameters' gradients and AdamW state the rank holds after the steps;
- `peak MB`: on CUDA, torch.cuda.max_memory_allocated over the training steps (the figure that decides whether a
  model fits); on CPU, the process's peak resident set (it includes loading the whole model before sharding and the
  Python/torch runtime, so it shows the ordering, not the division).

Shapes: `cpu` (a 4-layer Llama, d=512, runs anywhere in a minute), `llama-1b` (Llama-3.2-1B) and `llama-7b`
(Llama-2-7B) on GPUs. Random weights from a config (nothing is downloaded). Examples:
    python benchmarks/fsdp_memory.py                          # CPU shape, gloo, 1 and 2 processes
    python benchmarks/fsdp_memory.py --shape llama-1b --procs 1 2 4 --precision bf16   # one node, N GPUs
    python benchmarks/fsdp_memory.py --shape llama-7b --procs 2 4 8 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = {  # LlamaConfig keywords
    "cpu": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1536, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000),
}
MB = 2 ** 20


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import unipelt
    from unipelt.optim import param_groups
    from unipelt.train import distributed, sharding

    info = distributed.setup(args.device)
    cuda = info.device.type == "cuda"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    config = LlamaConfig(max_position_embeddings=args.seq, **SHAPES[args.shape])
    # the pretrained LM head stays frozen, as when fine-tuning a real checkpoint: only the adapters train
    method = {**unipelt.load_method(args.method).to_dict(), "train_head": False}
    model = unipelt.attach(AutoModelForCausalLM.from_config(config, dtype=dtype), method)
    if args.strategy == "fsdp" and info.enabled:
        sharding.shard(model, info, args.precision)  # moves each layer to the device as it shards it
        wrapped = model
    else:
        model.to(info.device)
        wrapped = distributed.wrap(model, info)
    params_mb = sum(_local_bytes(p) for p in model.parameters()) / MB
    groups = param_groups(model, 1e-4)
    for group in groups:
        group.pop("names", None)
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(info.rank)
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator).to(info.device)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients: they count as the rank's adapter state
    state_mb = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None) / MB
    state_mb += sum(_local_bytes(t) for s in optimizer.state.values() for t in s.values() if t.dim() > 0) / MB
    peak_mb = torch.cuda.max_memory_allocated() / MB if cuda else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"rank": info.rank, "params_mb": params_mb, "state_mb": state_mb, "peak_mb": peak_mb}
    rows = [None] * info.world_size
    if info.enabled:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    if info.is_main:
        Path(args.out).write_text(json.dumps(rows))
    distributed.teardown(info)


def driver(args: argparse.Namespace) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in args.procs:
            for strategy in ("ddp", "fsdp"):
                out = Path(tmp) / f"{procs}-{strategy}.json"
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                           __file__, "--worker", "--out", str(out), "--strategy", strategy, "--shape", args.shape,
                           "--method", args.method, "--steps", str(args.steps), "--batch", str(args.batch),
                           "--seq", str(args.seq), "--precision", args.precision, "--device", args.device]
                proc = subprocess.run(command, capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
                if proc.returncode != 0:
                    sys.exit(f"{procs} x {strategy} failed:\n{proc.stderr[-3000:]}")
                results.append((procs, strategy, json.loads(out.read_text())))
    print(f"per-rank memory, {args.method} on a {args.shape} Llama ({args.precision}, batch {args.batch} x "
          f"{args.seq} tokens per rank, {args.steps} steps, device {args.device})")
    print(f"{'procs':>5} {'strategy':>8} {'rank':>4} {'params MB':>10} {'adapter state MB':>17} {'peak MB':>9}")
    for procs, strategy, rows in results:
        for row in rows:
            print(f"{procs:>5} {strategy:>8} {row['rank']:>4} {row['params_mb']:>10.1f} {row['state_mb']:>17.2f} "
                  f"{row['peak_mb']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
