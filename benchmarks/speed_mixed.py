"""The mixed-adapter batch case of benchmarks/speed.py: 4 LoRAs (q, v; r 8, α 16) on one model and a batch of 8
rows, two per adapter, served by unipelt.mixed_batch and by PEFT's `model(**batch, adapter_names=[...])`, on the
same weights (PEFT's adapters, moved off their zero init, saved and read with unipelt.import_peft) and the same
batch. Both sides are timed interleaved in one process (each takes a step in turn), the median reported, so the
shared machine's drift falls on both alike; the outputs are compared first.

- infer: forward in eval() + inference_mode, the rows' adapters named anew at every batch (unipelt: the
  mixed_batch block entered and left around each forward; PEFT: adapter_names passed with each call);
  its base is the bare model's forward on the same 8 rows.
- step (unipelt only): forward + loss + backward + AdamW step of the four adapters, under mixed_batch. PEFT
  refuses adapter_names in training mode ("Cannot pass `adapter_names` when the model is in training mode").
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import unipelt

MIXED = ("mixed_lora4", "peft_mixed_lora4")
ADAPTERS = 4
ROWS = 8


def _peft_model(build_base: Callable, peft_config: Callable, shape: dict, dtype: torch.dtype,
                device: torch.device) -> Any:
    import peft

    config = peft_config("peft_lora_qv", 1)
    model = peft.get_peft_model(build_base(shape, dtype, device), config, adapter_name="l0")
    for index in range(1, ADAPTERS):
        model.add_adapter(f"l{index}", config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: every adapter its own non-zero Δ
                param.copy_(0.02 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model.eval()


def _ours(peft_model: Any, build_base: Callable, shape: dict, dtype: torch.dtype, device: torch.device) -> Any:
    model = build_base(shape, dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(ADAPTERS):
            name = f"l{index}"
            peft_model.save_pretrained(Path(tmp, name), selected_adapters=[name])
            folder = next(Path(tmp, name).rglob("adapter_config.json")).parent
            unipelt.import_peft(model, folder, name=name)
    return model.eval()


def _median(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def measure_mixed(args: Any, shape: dict, dtype: torch.dtype, device: torch.device, row_type: type,
                  build_base: Callable, peft_config: Callable, sync: Callable) -> list:
    """Rows for mixed_lora4 (unipelt) and peft_mixed_lora4 (PEFT), measured interleaved."""
    peft_model = _peft_model(build_base, peft_config, shape, dtype, device)
    ours = _ours(peft_model, build_base, shape, dtype, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape["vocab_size"], (ROWS, shape["seq"]), generator=g).to(device)
    names = [f"l{i % ADAPTERS}" for i in range(ROWS)]

    @torch.inference_mode()
    def ours_infer() -> torch.Tensor:
        with unipelt.mixed_batch(ours, names):
            return ours(input_ids=ids).logits

    @torch.inference_mode()
    def peft_infer() -> torch.Tensor:
        return peft_model(input_ids=ids, adapter_names=names).logits

    @torch.inference_mode()
    def base_infer() -> torch.Tensor:
        with unipelt.disabled(ours):
            return ours(input_ids=ids).logits

    mine, theirs, plain = ours_infer(), peft_infer(), base_infer()
    agree = float((mine - theirs).abs().max())
    moved = float((mine - plain).abs().max())

    unipelt.set_active(ours, [f"l{i}" for i in range(ADAPTERS)])  # all four train; rows split by mixed_batch
    ours.train()
    params = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def ours_step() -> None:
        with unipelt.mixed_batch(ours, names):
            loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def ours_eval_infer() -> None:
        ours.eval()
        ours_infer()
        ours.train()

    timed = {"ours_infer": ours_eval_infer, "peft_infer": peft_infer, "base_infer": base_infer, "ours_step": ours_step}
    times: dict[str, list[float]] = {key: [] for key in timed}
    for round_ in range(args.warmup + args.steps):
        for key, fn in timed.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= args.warmup:
                times[key].append(time.perf_counter() - start)
    base_ms = _median(times["base_infer"])
    note = (f"{ADAPTERS} LoRAs x {ROWS} rows, interleaved; logits = PEFT's to {agree:.1e} (adapters move them "
            f"{moved:.1e})")
    ours_row = row_type("mixed_lora4", step_ms=_median(times["ours_step"]), trainable=sum(p.numel() for p in params),
                        infer_ms=_median(times["ours_infer"]), note=note)
    peft_row = row_type("peft_mixed_lora4", infer_ms=_median(times["peft_infer"]),
                        trainable=sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n),
                        note="adapter_names=: inference only (refused in training mode)")
    for row in (ours_row, peft_row):
        row.base_infer_ms, row.rows = base_ms, ROWS
    return [ours_row, peft_row]


__all__ = ["MIXED", "measure_mixed"]
