"""The scaling functional form: (IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning"), a learned vector l that rescales a representation feature by feature.

On the four axes: Δh = (l − 1) ⊙ h, sequential (computed from h itself), composed by add, so h' = l ⊙ h; l starts
at ones, so the attached model starts as the base model. The paper puts it on the keys and values of every
attention (attn.k, attn.v) and on the FFN's hidden activation (ffn.act, the input of the down projection).
Δh is a per-feature linear map of h, so it merges: the rows of W_k, W_v (and their biases) scale by l, or the
columns of the FFN's down projection; unmerge divides them back.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from ..compose import Composer
from ..sites.names import ACTIVATION_SITES, PROJECTION_SITES
from ..module_spec import ModuleSpec, Placement
from ..slot import Delta, LinearMap, Slot
from .base import Built, Counts, Form, register


@dataclass(frozen=True)
class ScalingOptions:
    """(IA)³ has no option besides the four axes: its size is the width of the representation it rescales."""


class Scaling(Delta):
    """l ∈ R^d, starting at ones; Δh = (l − 1) ⊙ h."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scales = nn.Parameter(torch.ones(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.scales - 1).to(h.dtype) * h

    def linear_map(self) -> LinearMap:
        return LinearMap(self.scales.detach() - 1, diagonal=True)


class ScalingForm(Form):
    name = "scaling"
    Options = ScalingOptions
    sites = PROJECTION_SITES + ACTIVATION_SITES
    insertions = ("sequential",)
    compositions = ("add", "scale")

    def build(self, spec: "ModuleSpec", placements: list["Placement"], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        return Built([Slot(spec, Scaling(p.d_out), Composer(spec, p.d_in), p.site, p.chunk) for p in placements])

    def count(self, spec: "ModuleSpec", placements: list["Placement"]) -> Counts:
        """One scale per feature of h: d_out per placement (d_k, d_v, d_ff), plus the composer."""
        total = sum(p.d_out + Composer.parameter_count(spec, p.d_in) for p in placements)
        return Counts(added=total, trainable=total)


    def merges(self, spec: ModuleSpec) -> bool:
        return True  # a sequential per-feature scaling folds into the rows (or the consumer's columns) of W

    def starts_as_identity(self, spec: ModuleSpec) -> bool:
        return True  # l starts at ones


register(ScalingForm())
