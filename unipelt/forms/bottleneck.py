"""The bottleneck functional form: Δh = up(act(down(x))), with the adapter and LoRA inits (Houlsby, Pfeiffer,
parallel / scaled parallel adapters, LoRA, QLoRA, the multi-head parallel adapter).

With activation `none` and the `lora` init this is LoRA's B·A·x; at a head site (`attn.heads`) each head gets its
own bottleneck (He et al.'s multi-head parallel adapter), written as one block-structured map so it stays two
matrix products.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..compose import Composer
from ..errors import MethodConfigError
from ..module_spec import ModuleSpec, Placement
from ..sites.names import ALL_LINEAR, PROJECTION_SITES, SITES
from ..slot import Delta, LinearMap, Slot, chunk_rows
from ..spec_values import choice, expect, positive_float_value, positive_int_value, probability_value
from .base import AlphaScaledForm, Built, Counts, PeftLora, option, optional, register

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "none": nn.Identity}
INITS = ("bert", "lora", "lora_gaussian", "near_identity")
LAYERNORMS = ("none", "in", "out")
LORA_INITS = ("lora", "lora_gaussian")


@dataclass(frozen=True)
class BottleneckOptions:
    dim: int = option(64, "bottleneck width r (LoRA's rank)", positive_int_value)
    activation: str = option("relu", "activation between down and up; none + init lora is LoRA's B·A",
                             choice(tuple(ACTIVATIONS)))
    init: str = option("bert", "bert: small Gaussians; near_identity: Houlsby; lora / lora_gaussian: B starts at 0",
                       choice(INITS))
    layernorm: str = option("none", "a LayerNorm on the form's input (in) or output (out)", choice(LAYERNORMS))
    dropout: float = option(0.0, "dropout on the form's input", probability_value)
    bias: bool | None = option(None, "biases in down and up; default on for adapters, off for LoRA inits",
                               optional(expect(bool)))
    reduction_factor: int | None = option(None, "width d / reduction_factor at each site (AdapterHub's; overrides "
                                                "dim)", optional(positive_int_value))
    alpha: float | None = option(None, "sets compose scale's factor to alpha / dim (LoRA's lora_alpha / r), so it "
                                       "follows dim when a budget resizes it", optional(positive_float_value))

    def width(self, d_in: int) -> int:
        """The bottleneck width at a site whose form reads d_in features."""
        return self.dim if self.reduction_factor is None else max(1, d_in // self.reduction_factor)

    def at_site(self, d_in: int) -> "BottleneckOptions":
        """These options with `dim` the width at a site reading d_in features."""
        return dataclasses.replace(self, dim=self.width(d_in), reduction_factor=None)

    @property
    def has_bias(self) -> bool:
        if self.bias is not None:
            return self.bias
        return self.init not in LORA_INITS

    @property
    def is_linear(self) -> bool:
        return self.activation == "none" and self.layernorm == "none"


def init_down_up(down_weight: torch.Tensor, up_weight: torch.Tensor, init: str, rank: int) -> None:
    """Initialise the two matrices of a bottleneck in place; biases are zeroed by the caller."""
    with torch.no_grad():
        if init == "bert":  # AdapterHub / BERT: small Gaussians on both sides
            nn.init.normal_(down_weight, std=0.02)
            nn.init.normal_(up_weight, std=0.02)
        elif init == "near_identity":  # Houlsby et al.: tiny weights so the adapter starts as (almost) identity
            nn.init.trunc_normal_(down_weight, std=1e-3, a=-2e-3, b=2e-3)
            nn.init.trunc_normal_(up_weight, std=1e-3, a=-2e-3, b=2e-3)
        elif init == "lora":  # Hu et al. as implemented widely: Kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(down_weight, a=math.sqrt(5))
            nn.init.zeros_(up_weight)
        elif init == "lora_gaussian":  # the LoRA paper's wording: Gaussian A, zero B
            nn.init.normal_(down_weight, std=1.0 / rank)
            nn.init.zeros_(up_weight)
        else:  # spec validation makes this unreachable
            raise ValueError(f"unknown init {init!r}")


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the adapter's matrix products run in: autocast's where it is on, else the adapter weights'."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def matmul_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x ready for the adapter's matmuls. Under autocast they cast for themselves: an up-cast here would only
    copy the activation (bf16 → fp32, which autocast then casts back to bf16)."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


class Bottleneck(Delta):
    """down (d_in→r) → activation → up (r→d_out), with optional LayerNorm on the input or output and dropout."""

    def __init__(self, spec: "ModuleSpec | BottleneckOptions", d_in: int, d_out: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(d_in) if spec.layernorm == "in" else None
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.down = nn.Linear(d_in, spec.dim, bias=spec.has_bias)
        self.act = ACTIVATIONS[spec.activation]()
        self.up = nn.Linear(spec.dim, d_out, bias=spec.has_bias)
        self.norm_out = nn.LayerNorm(d_out) if spec.layernorm == "out" else None
        self.is_linear = spec.is_linear
        init_down_up(self.down.weight, self.up.weight, spec.init, spec.dim)
        for linear in (self.down, self.up):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(down(x)), after the optional input LayerNorm and dropout: everything before the up projection."""
        x = matmul_input(x, self.down.weight)
        if self.norm_in is not None:
            x = self.norm_in(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.act(self.down(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.hidden(x))
        if self.norm_out is not None:
            delta = self.norm_out(delta)
        return delta

    def can_add_into(self, h: torch.Tensor) -> bool:
        """True when add_scaled_into applies: no output LayerNorm, and h already in the matmul's dtype."""
        return self.norm_out is None and h.dtype == _matmul_dtype(h, self.up.weight)

    def add_scaled_into(self, h: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
        """h + scale·Δh with the up projection, the scale and the add done by one GEMM (addmm's C input), instead
        of a GEMM, a multiply and an add that each read and write an activation-sized tensor."""
        z = self.hidden(x)
        out = torch.addmm(h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1]), self.up.weight.t(), alpha=scale)
        if self.up.bias is not None:
            out = out.add(self.up.bias.to(out.dtype), alpha=scale)  # fp32 bias must not promote bf16 h
        return out.view(h.shape)

    def linear_map(self) -> LinearMap | None:
        """Δh = ΔW x + Δb, ΔW = up·down: only for a linear bottleneck (no activation, no LayerNorm)."""
        if not self.is_linear:
            return None
        bias = None
        if self.down.bias is not None:
            bias = self.up.weight @ self.down.bias + self.up.bias
        return LinearMap(self.up.weight @ self.down.weight, bias)


class HeadBottleneck(Delta):
    """One bottleneck per attention head: head i maps x (d_in) → r → head_dim, outputs concatenated over heads."""

    def __init__(self, spec: "ModuleSpec | BottleneckOptions", d_in: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.rank, self.head_dim = n_heads, spec.dim, head_dim
        self.norm_in = nn.LayerNorm(d_in) if spec.layernorm == "in" else None
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.down = nn.Linear(d_in, n_heads * spec.dim, bias=spec.has_bias)
        self.act = ACTIVATIONS[spec.activation]()
        self.up_weight = nn.Parameter(torch.empty(n_heads, spec.dim, head_dim))
        self.up_bias = nn.Parameter(torch.zeros(n_heads * head_dim)) if spec.has_bias else None
        self.norm_out = nn.LayerNorm(n_heads * head_dim) if spec.layernorm == "out" else None
        init_down_up(self.down.weight, self.up_weight, spec.init, spec.dim)
        if self.down.bias is not None:
            nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = matmul_input(x, self.down.weight)
        if self.norm_in is not None:
            x = self.norm_in(x)
        if self.dropout is not None:
            x = self.dropout(x)
        z = self.act(self.down(x)).unflatten(-1, (self.n_heads, self.rank))
        delta = torch.einsum("...hr,hrd->...hd", z, self.up_weight).flatten(-2)
        if self.up_bias is not None:
            delta = delta + self.up_bias
        if self.norm_out is not None:
            delta = self.norm_out(delta)
        return delta


class BottleneckForm(AlphaScaledForm):
    name = "bottleneck"
    Options = BottleneckOptions
    sites = SITES + (ALL_LINEAR,)
    insertions = ("sequential", "parallel")
    compositions = ("add", "scale", "sigmoid_gate")
    size_key = "dim"
    peft_lora_reads = {"use_dora": False}  # import_peft builds a plain PEFT LoRA as this form

    def with_size(self, options: BottleneckOptions, size: int) -> BottleneckOptions:
        # a solved width replaces a width set as d / reduction_factor
        return dataclasses.replace(options, dim=size, reduction_factor=None)

    def finish_module(self, spec: "ModuleSpec", raw: Mapping[str, Any], where: str) -> "ModuleSpec":
        finished = super().finish_module(spec, raw, where)
        if spec.options.alpha is not None and spec.options.reduction_factor is not None:
            raise MethodConfigError(f"{where}: alpha / dim needs one width; use dim, not reduction_factor")
        return finished

    def build(self, spec: "ModuleSpec", placements: list["Placement"], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        slots = []
        for p in placements:
            options = spec.options.at_site(p.d_in)
            if p.kind == "heads":
                form = HeadBottleneck(options, p.d_in, p.n_heads, p.head_dim)
            else:
                form = Bottleneck(options, p.d_in, p.d_out)
            # A sigmoid gate reads what the form reads (Mao et al.: x for LoRA, the adapter's input h for a
            # sequential adapter).
            slots.append(Slot(spec, form, Composer(spec, p.d_in), p.site, p.chunk))
        return Built(slots)

    def count(self, spec: "ModuleSpec", placements: list["Placement"]) -> Counts:
        """Per placement: down d_in·r and up r·d_out (per head at a head site), biases r + d_out when on,
        2·width per LayerNorm, plus the composer's parameters."""
        o = spec.options
        total = 0
        for p in placements:
            width = o.width(p.d_in)
            hidden, d_out = (p.n_heads * width, p.n_heads * p.head_dim) if p.kind == "heads" else (width, p.d_out)
            up = hidden * (p.head_dim if p.kind == "heads" else d_out)
            total += p.d_in * hidden + up + ((hidden + d_out) if o.has_bias else 0)
            total += 2 * p.d_in * (o.layernorm == "in") + 2 * d_out * (o.layernorm == "out")
            total += Composer.parameter_count(spec, p.d_in)
        return Counts(added=total, trainable=total)


    # ---- what the tester and export rely on -------------------------------------------------------------

    def merges(self, spec: ModuleSpec) -> bool:
        """A parallel linear map (no activation, no LayerNorm, no bias, as LoRA) at projections, composed by a
        constant, folds into W on every family; anything else keeps running as a module."""
        o = spec.options
        at_projections = all(site in PROJECTION_SITES or site == ALL_LINEAR for site in spec.at)
        return (o.is_linear and not o.has_bias and spec.insertion == "parallel" and at_projections
                and spec.compose in ("add", "scale"))

    def starts_as_identity(self, spec: ModuleSpec) -> bool:
        return spec.options.init in LORA_INITS  # B (up) starts at zero, so Δh is zero whatever the composition

    def peft_lora_export(self, slot: Slot) -> PeftLora | str:
        """PEFT's LoRA is exactly a parallel bottleneck with no activation, no LayerNorm and no bias at a projection,
        composed by add or scale: A is down.weight, B is up.weight."""
        spec, o = slot.spec, slot.spec.options
        if spec.insertion != "parallel":
            return f"insertion '{spec.insertion}' (PEFT LoRA needs insertion 'parallel')"
        for key, value in (("activation", o.activation), ("layernorm", o.layernorm)):
            if value != "none":
                return f"{key} '{value}' (PEFT LoRA needs {key} 'none')"
        if spec.compose not in ("add", "scale"):
            return f"compose '{spec.compose}' (PEFT LoRA needs add or scale)"
        if slot.site not in PROJECTION_SITES or not isinstance(slot.delta_module, Bottleneck):
            return f"site '{slot.site}' (PEFT LoRA acts on projections: {', '.join(PROJECTION_SITES)})"
        if o.has_bias:
            return "bias: true (PEFT LoRA has no bias in A and B)"
        delta = slot.delta_module
        return PeftLora(a=delta.down.weight, b=delta.up.weight, scale=float(slot.composer.merge_factor()),
                        config={"use_dora": False})

    def peft_lora_module(self, rank: int, scale: float, dropout: float) -> dict[str, Any]:
        return {"form": self.name, "insertion": "parallel", "compose": "scale", "scale": scale, "dim": rank,
                "activation": "none", "init": "lora", "bias": False, "dropout": dropout}

    def peft_lora_load(self, slot: Slot, lora: PeftLora, chunk: tuple[int, int] | None) -> None:
        with torch.no_grad():
            slot.delta_module.down.weight.copy_(lora.a)
            slot.delta_module.up.weight.copy_(lora.b[chunk_rows(chunk, lora.b.shape[0])])


register(BottleneckForm())
