"""Linear maps as the families store them: nn.Linear (and its quantized subclasses) keep W as [out, in]; GPT-2's
Conv1D keeps it as [in, out]. Every other module reads widths and weights through here."""

from __future__ import annotations

from torch import nn

from .. import compat
from ..errors import AttachError


def is_transposed(module: nn.Module) -> bool:
    """True for a linear map whose weight is stored [in, out] (GPT-2's Conv1D)."""
    return compat.is_transposed_linear(module)


def linear_dims(module: nn.Module, name: str = "") -> tuple[int, int]:
    """(in, out) of a linear map: nn.Linear and its quantized subclasses, or GPT-2's transposed Conv1D."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if is_transposed(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise AttachError(f"module '{name}' ({type(module).__name__}) is not a linear projection")


__all__ = ["is_transposed", "linear_dims"]
