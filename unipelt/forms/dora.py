"""The dora functional form: DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

DoRA splits a projection's weight into a magnitude and a direction, W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (norms
per output row), and trains m (d_out values, starting at the rows' norms ‖W‖) and the low-rank B·A (LoRA's A and B,
B starting at zero, s = alpha / r). As a Δh on the four axes (parallel: it reads the projection's input x; composed
by add, h' = h + Δh), with g = m / ‖W + s·B·A‖ per output row:

    Δh = (g − 1) ⊙ (W·drop(x)) + g ⊙ (s·B·A·drop(x))

which is h' = W'·x + b with dropout off. As in the paper (Section 4.3) and Hugging Face PEFT, the norm is treated
as a constant in backpropagation (no gradient through it). W is read from the host projection at every call
through the live accessor (dequantized from a 4-bit NF4 base, untransposed from GPT-2's Conv1D, restricted to a
fused projection's chunk), never from a copy taken at build time; m is set from it when the slot is installed,
after QLoRA has quantized the base, as PEFT does from the dequantized weight. The scale sits inside the form (g
depends on it), so the composition is add only. Merged, W becomes W + M with M = diag(g)·(W + s·B·A) − W; the
bias is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..compose import Composer
from ..errors import AdapterFileError, AttachError
from ..module_spec import ModuleSpec, Placement
from ..sites.names import ALL_LINEAR, PROJECTION_SITES
from ..slot import Delta, HostRef, LinearMap, Slot, chunk_rows
from ..spec_values import positive_float_value, positive_int_value, probability_value
from .base import Built, Counts, Form, PeftLora, option, optional, register

# PEFT's key suffix of the magnitude vector in adapter_model.safetensors ("<module>.lora_magnitude_vector").
MAGNITUDE_KEY = "lora_magnitude_vector"


@dataclass(frozen=True)
class DoRAOptions:
    """Defaults: r and alpha of the reference's finetune.py (NVlabs/DoRA); dropout off unless asked (PEFT's)."""

    dim: int = option(8, "rank r of the directional update B·A", positive_int_value)
    alpha: float = option(16.0, "LoRA's lora_alpha: B·A is scaled by alpha / dim (follows dim when a budget "
                                "resizes it)", positive_float_value)
    scaling: float | None = option(None, "the factor s on B·A itself, instead of alpha / dim (import_peft writes "
                                         "PEFT's own, e.g. rsLoRA's alpha / sqrt(r), exactly)",
                                   optional(positive_float_value))
    dropout: float = option(0.0, "dropout on x before both W·x and B·A·x (PEFT's lora_dropout)", probability_value)

    @property
    def factor(self) -> float:
        """s, the factor on B·A."""
        return self.alpha / self.dim if self.scaling is None else self.scaling


def row_norms(weight: torch.Tensor, low_rank: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ of every output row, in W's dtype (the one expression that sets m and that the forward and the
    merge divide by: bit-equal at install and at B = 0, so an untrained DoRA is exactly the base)."""
    return torch.linalg.norm(weight + scaling * low_rank, dim=1).to(weight.dtype)


class DoRADelta(Delta):
    """A (r × d_in, `down`), B (d_out × r, `up`) and m (d_out, `magnitude`) for one projection (or one chunk of a
    fused projection: `chunk`, whose rows of W it reads)."""

    def __init__(self, options: DoRAOptions, d_in: int, d_out: int, chunk: tuple[int, int] | None) -> None:
        super().__init__()
        self.scaling = options.factor
        self.chunk = chunk
        self.dropout = nn.Dropout(options.dropout) if options.dropout > 0 else None
        self.down = nn.Linear(d_in, options.dim, bias=False)
        self.up = nn.Linear(options.dim, d_out, bias=False)
        self.magnitude = nn.Parameter(torch.ones(d_out))  # set from the host's weight by bind_host
        with torch.no_grad():  # LoRA's init, as the reference and PEFT use it: Kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)

    def host_weight(self) -> torch.Tensor:
        """W as a dense [out, in] tensor, read now from the live host (the slot's rows of a fused projection)."""
        if self.host_ref is None:
            raise AttachError("dora: the host projection's weight is known once the slot is installed")
        weight = self.host_ref.weight()
        return weight[chunk_rows(self.chunk, weight.shape[0])]

    def low_rank(self) -> torch.Tensor:
        """B·A as a [d_out, d_in] matrix."""
        return self.up.weight @ self.down.weight

    def bind_host(self, host: HostRef) -> None:
        """At install (after a 4-bit base is quantized): m = ‖W + s·B·A‖, the row norms of the host's weight."""
        super().bind_host(host)
        with torch.no_grad():
            weight = self.host_weight().to(self.magnitude.dtype)
            self.magnitude.copy_(row_norms(weight, self.low_rank().to(weight.dtype), self.scaling))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.down.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.down.weight.dtype)  # under autocast the matmuls cast for themselves
        if self.dropout is not None:
            x = self.dropout(x)
        weight = self.host_weight().to(x.dtype)
        with torch.no_grad():  # the norm is a constant for backpropagation (Liu et al., Section 4.3)
            norm = row_norms(weight, self.low_rank().to(x.dtype), self.scaling)
        gain = (self.magnitude / norm).view(1, -1)
        # W·drop(x) is computed here, not taken from h: the slot hands a parallel form x only, and with dropout
        # on, PEFT too multiplies W by the dropped-out input.
        return (gain - 1) * F.linear(x, weight) + gain * self.up(self.down(x)) * self.scaling

    def linear_map(self) -> LinearMap:
        """M = diag(g)·(W + s·B·A) − W, so that merge's W + M is DoRA's merged weight g ⊙ (W + s·B·A)."""
        with torch.no_grad():
            weight = self.host_weight().detach()
            low_rank = self.low_rank().to(weight.dtype)
            gain = self.magnitude.to(weight.dtype) / row_norms(weight, low_rank, self.scaling)
            return LinearMap(gain.view(-1, 1) * (weight + low_rank * self.scaling) - weight)


class DoRAForm(Form):
    name = "dora"
    Options = DoRAOptions
    sites = PROJECTION_SITES + (ALL_LINEAR,)
    insertions = ("parallel",)
    compositions = ("add",)  # s acts inside the norm, so DoRA is not h + s·Δh for any Δh free of s
    size_key = "dim"
    peft_lora_reads = {"use_dora": True}
    peft_lora_tensors = (MAGNITUDE_KEY,)

    def build(self, spec: "ModuleSpec", placements: list["Placement"], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        return Built([Slot(spec, DoRADelta(spec.options, p.d_in, p.d_out, p.chunk), Composer(spec, p.d_in), p.site,
                           p.chunk) for p in placements])

    def count(self, spec: "ModuleSpec", placements: list["Placement"]) -> Counts:
        """Per target matrix: A r·d_in, B d_out·r, m d_out (the composer, add, adds nothing)."""
        r = spec.options.dim
        total = sum(r * (p.d_in + p.d_out) + p.d_out + Composer.parameter_count(spec, p.d_in) for p in placements)
        return Counts(added=total, trainable=total)

    def merges(self, spec: "ModuleSpec") -> bool:
        return True  # parallel at projections, composed by add: W' = g ⊙ (W + s·B·A) folds on every family

    def starts_as_identity(self, spec: "ModuleSpec") -> bool:
        return True  # B = 0 and m = ‖W‖ by the same expression: g = 1 exactly, Δh = 0

    # ---- Hugging Face PEFT's LoraConfig(use_dora=True) files ---------------------------------------------------

    def peft_lora_export(self, slot: Slot) -> PeftLora | str:
        """A, B and m as PEFT stores them. Not stackable: the norm is taken over the whole row, so two modules on
        one projection are not one DoRA of the summed rank (and the chunks of a fused projection would need their
        magnitudes assembled into one vector, which export does not do)."""
        delta = slot.delta_module
        return PeftLora(a=delta.down.weight, b=delta.up.weight, scale=delta.scaling, config={"use_dora": True},
                        tensors={MAGNITUDE_KEY: delta.magnitude}, stackable=False)

    def peft_lora_module(self, rank: int, scale: float, dropout: float) -> dict[str, Any]:
        # `scaling` carries PEFT's s exactly ((s·r) / r need not give back s's bits); alpha is there to read.
        return {"form": self.name, "insertion": "parallel", "compose": "add", "dim": rank, "alpha": scale * rank,
                "scaling": scale, "dropout": dropout}

    def peft_lora_load(self, slot: Slot, lora: PeftLora, chunk: tuple[int, int] | None) -> None:
        delta = slot.delta_module
        magnitude = lora.tensors[MAGNITUDE_KEY]
        if tuple(magnitude.shape) != (lora.b.shape[0],):
            name = slot.host_ref.name if slot.host_ref is not None else "?"
            raise AdapterFileError(f"import_peft: the {MAGNITUDE_KEY} of '{name}' has shape "
                                   f"{tuple(magnitude.shape)} in the file, ({lora.b.shape[0]},) for its lora_B")
        rows = chunk_rows(chunk, lora.b.shape[0])
        with torch.no_grad():
            delta.down.weight.copy_(lora.a)
            delta.up.weight.copy_(lora.b[rows])
            delta.magnitude.copy_(magnitude[rows])


register(DoRAForm())
