"""Composition functions (how Δh meets h) and the slot that pairs a functional form with one of them.

`gate` (the prefix softmax gate) is not here: it falls out of attending over [P; K] and lives in attention.py.
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import ModuleSpec


def sigmoid_gate_linear(d_in: int) -> nn.Linear:
    """UniPELT's gate W_g: one output, N(0, 0.02) weights and a zero bias (BERT's init, which Mao et al.'s gates get
    as modules of the model)."""
    gate = nn.Linear(d_in, 1)
    nn.init.normal_(gate.weight, std=0.02)
    nn.init.zeros_(gate.bias)
    return gate


def mean_sigmoid_gate(gate: nn.Linear, x: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """mean over tokens of σ(W_g·x) (the sigmoid first, as Mao et al.'s code; padding tokens included, as there):
    [batch, 1] (or [batch, 1, 1] with keepdim) for x [batch, tokens, d]; σ(W_g·x) itself for x [batch, d]."""
    values = torch.sigmoid(gate(x.to(gate.weight.dtype)))
    return values.mean(dim=-2, keepdim=keepdim) if x.dim() > 2 else values


class Composer(nn.Module):
    """h' = h + Δh (add), h + s·Δh (scale, s fixed or learned), or h + g·Δh (sigmoid_gate) with Mao et al.'s gate
    g = mean over tokens of σ(W_g·x) (one scalar per example; W_g ~ N(0, 0.02), zero bias)."""

    def __init__(self, spec: ModuleSpec, d_gate_in: int) -> None:
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

    def factor(self, x: torch.Tensor | None) -> torch.Tensor | float:
        """The multiplier of Δh: a float, a learned scalar, or a gate of shape [batch, 1, 1]."""
        if self.gate is not None:
            if x is None:
                raise RuntimeError("sigmoid_gate needs the sub-layer input, which was not captured")
            gate = mean_sigmoid_gate(self.gate, x, keepdim=True)
            self.last_gate = gate.detach().mean()
            return gate
        if self.learned_scale is not None:
            return self.learned_scale
        return self.fixed_scale

    def fixed_factor(self) -> float | None:
        """The multiplier of Δh when it is a constant (add, fixed scale), else None."""
        return self.fixed_scale if self.gate is None and self.learned_scale is None else None

    def forward(self, h: torch.Tensor, delta: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        factor = self.factor(x)
        if isinstance(factor, float):  # one multiply-add kernel, no scaled copy of Δh
            return torch.add(h, delta.to(h.dtype), alpha=factor)
        return h + (factor * delta).to(h.dtype)


def chunk_rows(chunk: tuple[int, int] | None, out_features: int) -> slice:
    """The output rows a slot modifies: all, or its (index, count) chunk of a fused projection (GPT-2's c_attn)."""
    if chunk is None:
        return slice(None)
    index, count = chunk
    width = out_features // count
    return slice(index * width, (index + 1) * width)


class Slot(nn.Module):
    """One placed module: Δh = form(x or h), composed into h. `active` / `merged` switch it off in forward."""

    def __init__(self, spec: ModuleSpec, form: nn.Module, composer: Composer, site: str,
                 chunk: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.site = site
        self.form = form
        self.composer = composer
        self.chunk = chunk  # (index, count): h is one slice of a fused projection output (GPT-2's c_attn)
        self.active = True
        self.merged = False
        self.captured_x: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return self.active and not self.merged

    def forward(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        parallel = self.spec.insertion == "parallel"
        if self.chunk is None:
            source = x if parallel else h
            scale = self.composer.fixed_factor()
            fusable = getattr(self.form, "can_add_into", None)
            if scale is not None and fusable is not None and fusable(h):  # up-projection, scale and add: one GEMM
                return self.form.add_scaled_into(h, source, scale)
            return self.composer(h, self.form(source), source)
        index, count = self.chunk
        pieces = list(h.chunk(count, dim=-1))
        source = x if parallel else pieces[index]
        pieces[index] = self.composer(pieces[index], self.form(source), source)
        return torch.cat(pieces, dim=-1)

    def training_metrics(self) -> dict[str, float]:
        if self.composer.last_gate is None:
            return {}
        return {"gate": float(self.composer.last_gate)}

    def exported_parameters(self) -> dict[str, torch.Tensor]:
        """What is saved: the parameters, with a rank-pruned form (svd) cut to its kept triplets."""
        tensors = dict(self.named_parameters())
        pruned = getattr(self.form, "pruned_parameters", None)
        if pruned is not None:
            tensors.update({f"form.{name}": value for name, value in pruned().items()})
        return tensors
