"""The composition axis (how Δh meets h), written once and used by every slot: bottleneck, svd, (IA)³, prefix
and prompt alike.

- `add`:          h + Δh
- `scale`:        h + s·Δh, s fixed (α/r, 4, ...) or `learned` (a trainable scalar starting at 1)
- `sigmoid_gate`: h + g·Δh, g = mean_tokens σ(W_g·x), one gate per example (UniPELT, Mao et al. 2022)
- `gate`:         the prefix's softmax gate, (1−λ)·h + λ·Δh with λ the attention mass on the prefix: it falls out
                  of attending over [P; K] (forms/prefix/attention.py), so here its factor is 1.

The factor is linear in Δh, so a slot whose Δh is linear folds into a weight as factor·ΔW and unfolds by the
inverse (merge_factor): a constant for add / scale, none for the gates (they depend on the input).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .row_extent import own_widths


def sigmoid_gate_linear(d_in: int) -> nn.Linear:
    """UniPELT's gate W_g: one output, N(0, 0.02) weights and a zero bias (BERT's init, which Mao et al.'s gates get
    as modules of the model)."""
    gate = nn.Linear(d_in, 1)
    nn.init.normal_(gate.weight, std=0.02)
    nn.init.zeros_(gate.bias)
    return gate


def mean_sigmoid_gate(gate: nn.Linear, x: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """mean over tokens of σ(W_g·x) (the sigmoid first, as Mao et al.'s code; padding tokens included, as there):
    [batch, 1] (or [batch, 1, 1] with keepdim) for x [batch, tokens, d]; σ(W_g·x) itself for x [batch, d]. In a
    mixed batch whose rows are padded past their own length (unipelt.row_extent), over each row's own tokens."""
    values = torch.sigmoid(gate(x.to(gate.weight.dtype)))
    if x.dim() <= 2:
        return values
    widths = own_widths(x)
    if widths is None:
        return values.mean(dim=-2, keepdim=keepdim)
    own = torch.arange(x.shape[-2], device=x.device)[None, :] < widths[:, None]  # [batch, tokens]
    total = (values * own.unsqueeze(-1).to(values.dtype)).sum(dim=-2, keepdim=keepdim)
    return total / widths.to(values.dtype).reshape(-1, *([1] * (total.dim() - 1)))


class Composer(nn.Module):
    """The composition of one slot; `spec` is anything with `compose` and `scale` (a module spec). The sigmoid
    gate is Mao et al.'s g = mean over tokens of σ(W_g·x), one scalar per example (W_g ~ N(0, 0.02), zero bias)."""

    def __init__(self, spec: Any, d_gate_in: int) -> None:
        super().__init__()
        self.fixed_scale = 1.0
        self.learned_scale = None
        self.gate = None
        self.last_gate: torch.Tensor | None = None  # mean gate of the last forward, for training_metrics()
        if spec.compose == "scale":
            if spec.scale == "learned":
                self.learned_scale = nn.Parameter(torch.ones(()))
            else:
                self.fixed_scale = float(spec.scale)
        elif spec.compose == "sigmoid_gate":
            self.gate = sigmoid_gate_linear(d_gate_in)

    @staticmethod
    def parameter_count(spec: Any, d_gate_in: int) -> int:
        """What a composer adds (Appendix B): one scalar for a learned scale, d + 1 for a sigmoid gate."""
        if spec.compose == "scale" and spec.scale == "learned":
            return 1
        return d_gate_in + 1 if spec.compose == "sigmoid_gate" else 0

    def factor(self, x: torch.Tensor | None, like: torch.Tensor | None = None) -> torch.Tensor | float:
        """The multiplier of Δh: a float, a learned scalar, or a gate of shape [batch, 1, ..., 1] (as many dims as
        `like`, the Δh it multiplies; [batch, 1, 1] without it)."""
        if self.gate is not None:
            if x is None:
                raise RuntimeError("sigmoid_gate needs the sub-layer input, which was not captured")
            gate = mean_sigmoid_gate(self.gate, x, keepdim=False)  # [batch, 1]
            self.last_gate = gate.detach().mean()
            dims = (like.dim() if like is not None else 3) - gate.dim()
            return gate.reshape(*gate.shape, *([1] * dims))
        if self.learned_scale is not None:
            return self.learned_scale
        return self.fixed_scale

    def fixed_factor(self) -> float | None:
        """The multiplier of Δh when it is a constant (add, fixed scale), else None."""
        return self.fixed_scale if self.gate is None and self.learned_scale is None else None

    def merge_factor(self) -> float | None:
        """The multiplier to fold into a weight with Δh (a learned scale at its current value), None for a gate."""
        if self.gate is not None:
            return None
        if self.learned_scale is not None:
            return float(self.learned_scale.detach())
        return self.fixed_scale

    def forward(self, h: torch.Tensor, delta: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        factor = self.factor(x, delta)
        if isinstance(factor, float):  # one multiply-add kernel, no scaled copy of Δh
            return torch.add(h, delta.to(h.dtype), alpha=factor)
        return h + (factor * delta).to(h.dtype)
