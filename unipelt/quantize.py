"""QLoRA's frozen base (Dettmers et al. 2023): projection weights in 4-bit NF4 through bitsandbytes.

bitsandbytes (>= 0.48) quantizes to NF4 and runs 4-bit linear layers forward and backward on CPU as well as on
CUDA, so the same path serves both; only the speed differs. Double quantization stores the per-block (64
weights) absmax scales in 8 bits too. The replaced modules are kept, moved to host memory, so that detach()
restores the original model bit for bit while the accelerator holds only the 4-bit weights.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import torch
from torch import nn

from .errors import AttachError
from .sites.linear import is_transposed



class QuantizeSettings(Protocol):
    """What quantization reads of a method spec (unipelt.spec.MethodSpec, which sits above this layer)."""

    name: str
    quantize: str
    compute_dtype: str
    double_quant: bool

BLOCKSIZE = 64  # the QLoRA paper's NF4 block size
SUPPORTED_DEVICES = ("cpu", "cuda", "xpu")


def check_quantization(model: nn.Module, spec: QuantizeSettings) -> None:
    """Raise before anything changes when the base cannot be quantized here."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AttachError(f"method '{spec.name}': quantize '{spec.quantize}' needs bitsandbytes; "
                          "pip install 'unipelt[qlora]' (or bitsandbytes>=0.48)")
    device = next(model.parameters()).device.type
    if device not in SUPPORTED_DEVICES + ("meta",):
        raise AttachError(f"method '{spec.name}': quantize '{spec.quantize}' is not supported on device "
                          f"'{device}' (allowed: {', '.join(SUPPORTED_DEVICES)})")


def is_4bit(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.detach().T if is_transposed(module) else module.weight.detach()


def quantize_module(module: nn.Module, spec: QuantizeSettings) -> nn.Module:
    """A bitsandbytes Linear4bit computing what `module` (nn.Linear or Conv1D) computes, up to NF4 rounding."""
    import bitsandbytes as bnb

    weight = _weight_out_in(module)
    out_features, in_features = weight.shape
    bias = getattr(module, "bias", None)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                              compute_dtype=getattr(torch, spec.compute_dtype),
                              compress_statistics=spec.double_quant, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.contiguous().clone(), requires_grad=False, blocksize=BLOCKSIZE,
                                     compress_statistics=spec.double_quant, quant_type="nf4", module=layer)
    layer.weight = layer.weight.to(weight.device)  # moving a Params4bit to a real device quantizes it
    if bias is not None:
        # A copy: bitsandbytes casts its bias to the compute dtype in place, and detach() must give back the
        # original bit for bit.
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    # bitsandbytes repacks the weight in place for CPU inference (eval, no grad) when AVX512-BF16 is present; that
    # layout breaks merge and small layers (in_features < block size), so keep the standard one.
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_base(model: nn.Module, spec: QuantizeSettings, names: list[str],
                  replaced: list[tuple[str, nn.Module, Any]]) -> None:
    """Replace the named projections by 4-bit layers, appending (name, original, device) to `replaced` as each one
    is done (so that a failure half-way can still be undone by restore_base)."""
    if not names or next(model.parameters()).device.type == "meta":
        return  # counting on meta: shapes only, quantization changes no parameter count
    modules = dict(model.named_modules())
    for name in names:
        original = modules[name]
        quantized = quantize_module(original, spec)
        device = original.weight.device
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, quantized)
        replaced.append((name, original, device))
        original.to("cpu")  # frees accelerator memory; detach() moves it back


def restore_base(model: nn.Module, replaced: list[tuple[str, nn.Module, Any]]) -> None:
    modules = dict(model.named_modules())
    for name, original, device in replaced:
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, original.to(device))


def dequantize(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


@torch.no_grad()
def add_to_4bit(module: nn.Module, rows: slice, delta_w: torch.Tensor) -> tuple[float, Any]:
    """W ← Q(deQ(W) + ΔW) on the given rows; returns (max |rounding error| of the result, undo token)."""
    import bitsandbytes as bnb

    before = (module.weight.data, module.weight.quant_state)
    target = dequantize(module)
    target[rows] += delta_w.float()
    dtype = module.weight.quant_state.dtype
    params = bnb.nn.Params4bit(target.to(dtype), requires_grad=False, blocksize=module.weight.blocksize,
                               compress_statistics=module.weight.compress_statistics, quant_type="nf4",
                               module=module)
    module.weight = params.to(before[0].device)
    error = (dequantize(module) - target).abs().max().item()
    return error, before


@torch.no_grad()
def restore_4bit(module: nn.Module, token: Any) -> None:
    """Put back the exact packed weights from before add_to_4bit (unmerge without a second rounding)."""
    data, quant_state = token
    module.weight.data = data
    module.weight.quant_state = quant_state


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear map as a dense [out, in] tensor: dequantized (float32) from 4-bit NF4, transposed
    from GPT-2's Conv1D, else the weight itself (with its autograd history, not a copy)."""
    if is_4bit(module):
        return dequantize(module)
    return module.weight.T if is_transposed(module) else module.weight


def element_count(param: torch.Tensor) -> int:
    """Number of weights a parameter stands for (a packed 4-bit tensor holds two per byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()
