"""Training-step time, peak memory and inference latency of every unipelt preset, next to full fine-tuning and
to the equivalent Hugging Face PEFT configuration, measured in one process on the same base weights and batch.

    python benchmarks/speed.py                       # gpu1b on a CUDA machine, else the small CPU shape
    python benchmarks/speed.py --shape cpu --steps 8 --warmup 2 --methods full,lora,lora_all,peft_lora_qv
    python benchmarks/speed.py --methods mixed_lora4,peft_mixed_lora4   # 4 LoRAs x 8 rows: mixed_batch vs PEFT

See benchmarks/README.md for what each column means; the mixed-adapter batch case is benchmarks/speed_mixed.py.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import importlib.util
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import unipelt
from speed_mixed import MIXED, measure_mixed
from unipelt.attach import state_of

SHAPES = {
    # A Llama-style 1B model (TinyLlama's geometry) with random weights.
    "gpu1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=5632, vocab_size=32000, batch=8, seq=512),
    # The same proportions, small enough for two CPU cores.
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=704, vocab_size=4000, batch=4, seq=128),
}

# Benchmark-only methods that are not presets: LoRA r16 (alpha 32) on every linear layer of the blocks.
EXTRA_METHODS: dict[str, dict[str, Any]] = {
    "lora_all": {"name": "lora_all", "modules": [{
        "form": "bottleneck", "at": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"],
        "insertion": "parallel", "compose": "scale", "scale": 2.0, "dim": 16, "activation": "none",
        "init": "lora"}]},
}

# unipelt method -> the PEFT configuration that computes the same thing (PEFT 0.21 defaults otherwise).
PEFT_EQUIVALENT = {"lora": "peft_lora_qv", "lora_all": "peft_lora_all", "prefix": "peft_prefix",
                   "prompt_tuning": "peft_prompt", "adalora": "peft_adalora", "mixed_lora4": "peft_mixed_lora4"}
CUDA_ONLY = {"qlora"}


def peft_config(name: str, steps: int) -> Any:
    """PEFT configurations matching the presets: LoRA q,v r8; LoRA all-linear r16; prefix 30 with the MLP of
    width 800; prompt tuning 30 tokens; AdaLoRA (initial rank 12, target 8)."""
    import peft

    task = peft.TaskType.CAUSAL_LM
    if name == "peft_lora_qv":
        return peft.LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    if name == "peft_lora_all":
        return peft.LoraConfig(task_type=task, r=16, lora_alpha=32, target_modules="all-linear")
    if name == "peft_prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=30, prefix_projection=True,
                                       encoder_hidden_size=800)
    if name == "peft_prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=30)
    if name == "peft_adalora":
        return peft.AdaLoraConfig(task_type=task, init_r=12, target_r=8, total_step=max(steps, 10),
                                  target_modules=["q_proj", "v_proj"])
    raise ValueError(f"unknown PEFT method {name!r}")


PEFT_METHODS = ("peft_lora_qv", "peft_lora_all", "peft_prefix", "peft_prompt", "peft_adalora")


# ----------------------------------------------------------------------------------------------------- memory


class Memory:
    """Peak memory of one measurement. CUDA: torch's allocator peak (max_memory_allocated, everything live on
    the device: weights, gradients, optimizer state, activations). CPU: the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the model was built, with glibc
    told to give freed tensors straight back to the OS so that the resident set follows live tensors."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.baseline = 0
        if not self.cuda:
            try:  # M_MMAP_THRESHOLD = -3: a fixed threshold, so large buffers are mmap'ed and unmapped on free
                ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
            except OSError:
                pass

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        self.baseline = self._status("VmRSS:")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        except OSError:
            pass

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.baseline
        return self._status("VmHWM:") - self.baseline


# ----------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


# ----------------------------------------------------------------------------------------------------- models


@dataclass
class Row:
    method: str
    step_ms: float | None = None
    peak_bytes: int | None = None
    trainable: int | None = None
    infer_ms: float | None = None
    merged_ms: float | None = None
    note: str = ""
    rows: int | None = None  # another batch than the shape's (the mixed case): no ratios to full fine-tuning
    base_infer_ms: float | None = None  # the bare model's latency on that batch


def build_base(shape: dict, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """The same random weights every time (fixed seed), built directly on the device."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size")
    config = LlamaConfig(**{k: shape[k] for k in keys}, max_position_embeddings=max(2048, shape["seq"] + 64),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model


def make_batch(shape: dict, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(device)


def prepare(name: str, model: torch.nn.Module, steps: int) -> tuple[torch.nn.Module, Callable | None]:
    """Attach the method; returns the model to call and a merge function (None when nothing can merge)."""
    if name.startswith("peft_"):
        import peft

        wrapped = peft.get_peft_model(model, peft_config(name, steps))
        if name in ("peft_lora_qv", "peft_lora_all"):
            return wrapped, wrapped.merge_adapter
        return wrapped, None
    spec = unipelt.load_method(EXTRA_METHODS.get(name, name))
    if spec.train_base != "all":  # the LM head here is the pretrained one, not a new task head: PEFT freezes it too
        spec = dataclasses.replace(spec, train_head=False)
    unipelt.attach(model, spec)
    state = state_of(model)
    mergeable = bool(state.slots) and all(
        getattr(slot.spec, "is_linear", False) and slot.spec.insertion == "parallel" for slot in state.slots.values()
    )

    def merge() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unipelt.merge(model)

    return model, (merge if mergeable else None)


def measure(name: str, args: argparse.Namespace, shape: dict, dtype: torch.dtype, device: torch.device,
            memory: Memory) -> Row:
    row = Row(name)
    ids = make_batch(shape, device)
    autocast = args.dtype == "autocast"
    memory.start()
    model = build_base(shape, dtype, device)
    model, merge = prepare(name, model, args.steps + args.warmup)
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    row.trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model

    total = args.steps + args.warmup
    taken = [0]
    adalora_allocate = getattr(getattr(model, "base_model", None), "update_and_allocate", None)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=ids, labels=ids).loss
            if unipelt.is_attached(model):  # the method/trainer contract (e.g. AdaLoRA's regulariser)
                extra = unipelt.regularization_loss(model)
                loss = loss if extra is None else loss + extra
        loss.backward()
        optimizer.step()
        taken[0] += 1
        if unipelt.is_attached(model):
            unipelt.on_optimizer_step(model, min(taken[0], total), total)
        elif name.startswith("peft_") and adalora_allocate is not None:
            adalora_allocate(min(taken[0], total))
        optimizer.zero_grad(set_to_none=True)

    row.step_ms = median_ms(train_step, args.steps, args.warmup, device)
    row.peak_bytes = memory.peak()
    optimizer.state.clear()  # inference is measured next: give the optimizer state back first
    gc.collect()
    model.eval()

    @torch.inference_mode()
    def infer() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            forward(input_ids=ids)

    row.infer_ms = median_ms(infer, args.steps, args.warmup, device)
    if merge is not None:
        merge()
        row.merged_ms = median_ms(infer, args.steps, args.warmup, device)
    return row


# ----------------------------------------------------------------------------------------------------- table


def default_methods(peft_available: bool) -> list[str]:
    names = ["full"] + [p for p in unipelt.list_presets() if p != "full"] + list(EXTRA_METHODS)
    if peft_available:
        names += list(PEFT_METHODS) + list(MIXED)
    return names


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def render(rows: list[Row]) -> str:
    by_name = {r.method: r for r in rows}
    full = by_name.get("full")
    header = ["method", "step ms", "vs full", "vs peft", "peak MiB", "mem vs full", "mem vs peft",
              "trainable", "infer ms", "vs base", "infer vs peft", "merged ms", "note"]
    lines = []
    for r in rows:
        peer = by_name.get(PEFT_EQUIVALENT.get(r.method, ""))
        if r.step_ms is None and r.infer_ms is None:
            lines.append([r.method] + ["-"] * (len(header) - 2) + [r.note])
            continue
        ref = full if r.rows is None else None  # full fine-tuning ran another batch than a mixed case's
        base_infer = r.base_infer_ms if r.base_infer_ms is not None else (full.infer_ms if full else None)
        lines.append([
            r.method, _ms(r.step_ms), ratio(r.step_ms, ref and ref.step_ms), ratio(r.step_ms, peer and peer.step_ms),
            "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}",
            ratio(r.peak_bytes, ref and ref.peak_bytes), ratio(r.peak_bytes, peer and peer.peak_bytes),
            "-" if r.trainable is None else f"{r.trainable:,}", _ms(r.infer_ms), ratio(r.infer_ms, base_infer),
            ratio(r.infer_ms, peer and peer.infer_ms),
            "-" if r.merged_ms is None else f"{r.merged_ms:.1f} ({ratio(r.merged_ms, base_infer)})", r.note,
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [fmt(line) for line in lines])


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpu1b" if cuda else "cpu")
    parser.add_argument("--steps", type=int, default=20 if cuda else 6, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2, help="untimed steps first")
    parser.add_argument("--methods", default="", help="comma-separated; default: full, every preset, lora_all "
                        "and the PEFT equivalents (" + ", ".join(PEFT_METHODS) + ")")
    parser.add_argument("--dtype", choices=("bf16", "fp32", "autocast"), default="bf16" if cuda else "fp32",
                        help="bf16: weights and adapters in bf16; fp32; autocast: fp32 weights under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model before timing")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if cuda else "cpu")
    if args.shape == "gpu1b" and not cuda:
        parser.error("--shape gpu1b needs a CUDA device (allowed on CPU: --shape cpu)")
    peft_available = importlib.util.find_spec("peft") is not None
    if peft_available:  # imported now, so its import does not count in the first PEFT method's CPU memory
        importlib.import_module("peft")
    known = set(default_methods(peft_available))  # includes the PEFT methods when peft is installed
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or default_methods(peft_available)
    unknown = [m for m in methods if m not in known and m not in CUDA_ONLY]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = SHAPES[args.shape]
    memory = Memory(device)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"shape {args.shape} ({shape}), dtype {args.dtype}, {name}, torch {torch.__version__}, "
          f"steps {args.steps} (median) after {args.warmup} warm-up"
          + (", compiled" if args.compile else "") + (", checkpointing" if args.checkpointing else ""), flush=True)
    rows = []
    for method in methods:
        if method in CUDA_ONLY and not cuda:
            rows.append(Row(method, note="skipped: needs CUDA"))
            continue
        if method in MIXED:  # both sides measured together, interleaved (speed_mixed.py)
            if not any(row.method in MIXED for row in rows):
                try:
                    rows.extend(measure_mixed(args, shape, dtype, device, Row, build_base, peft_config, sync))
                except Exception as error:  # noqa: BLE001 - one case failing should not lose the table
                    rows.append(Row(method, note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"))
                print(f"  measured {', '.join(MIXED)}", flush=True)
            continue
        try:
            rows.append(measure(method, args, shape, dtype, device, memory))
        except Exception as error:  # one method failing should not lose the rest of the table
            rows.append(Row(method, note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"))
        gc.collect()
        print(f"  measured {method}", flush=True)
    print(render(rows))


if __name__ == "__main__":
    main()
