"""The svd functional form (AdaLoRA, Zhang et al. 2023): Δh = P·diag(λ ⊙ m)·Q·x.

P (d_out × r) and Q (r × d_in) play the singular vectors, λ the singular values; m is the 0/1 mask the rank
allocator (unipelt/rank_allocator.py) sets when it prunes triplets (P[:, i], λ_i, Q[i, :]) to the budget. As in
the paper, λ starts at zero (the module starts as the identity) and P, Q are Gaussian; the orthogonal
regulariser γ·(‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F) keeps P and Q near-orthogonal so that λ stays a faithful importance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..compose import Composer
from ..errors import MethodConfigError
from ..full_tensor import full
from ..rank_allocator import RankAllocator
from ..sites.names import ALL_LINEAR, PROJECTION_SITES
from ..slot import LinearMap, Slot
from ..spec_values import positive_int_value, probability_value
from .base import Built, Counts, Form, option, register
from .bottleneck import matmul_input

if TYPE_CHECKING:
    from ..placement import Placement
    from ..spec import ModuleSpec


def _schedule_point(value: Any, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            isinstance(value, float) and value >= 1):
        key = where.rpartition(": ")[2]
        raise MethodConfigError(f"{where.rpartition(': ')[0]}: {key} must be a step count (int >= 0) or a fraction "
                                f"of the run (float in [0, 1)), got {value!r}")
    return value


def _non_negative(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        key = where.rpartition(": ")[2]
        raise MethodConfigError(f"{where.rpartition(': ')[0]}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _rank_pattern(value: Any, where: str) -> tuple[tuple[str, int], ...] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise MethodConfigError(f"{where} must map 'stack.layer.site' to a rank, got {value!r}")
    for key, rank in value.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise MethodConfigError(f"{where}['{key}'] must be an integer in 0..init_r, got {rank!r}")
    return tuple(sorted((str(k), int(v)) for k, v in value.items()))


@dataclass(frozen=True)
class SVDOptions:
    init_r: int = option(12, "initial rank of every target matrix", positive_int_value)
    target_r: int = option(8, "average rank per matrix after pruning (the final budget)", positive_int_value)
    tinit: int | float = option(0.1, "warm-up before pruning: steps (int) or fraction of the run (float)",
                                _schedule_point)
    tfinal: int | float = option(0.3, "final fine-tuning at the target budget: steps or fraction", _schedule_point)
    delta_t: int = option(10, "steps between two budget updates", positive_int_value)
    beta1: float = option(0.85, "smoothing of the sensitivity", probability_value)
    beta2: float = option(0.85, "smoothing of the uncertainty", probability_value)
    orth_reg_weight: float = option(0.1, "weight γ of the orthogonal regulariser", _non_negative)
    rank_pattern: tuple[tuple[str, int], ...] | None = option(
        None, "pruned ranks 'stack.layer.site' -> r of a saved adapter (written by save_adapter)", _rank_pattern)


class SVDDelta(nn.Module):
    """One target matrix's update in SVD form, with a rank mask and its orthogonal regulariser."""

    def __init__(self, spec: "ModuleSpec | SVDOptions", d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.empty(d_out, rank).normal_(std=0.02))  # P
        self.singular = nn.Parameter(torch.zeros(rank))  # λ
        self.right = nn.Parameter(torch.empty(rank, d_in).normal_(std=0.02))  # Q
        # Not persistent: the mask is an allocator decision, saved as the pruned shapes (rank_pattern) instead.
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool), persistent=False)
        self.orth_reg_weight = spec.orth_reg_weight

    @property
    def rank(self) -> int:
        return self.singular.shape[0]

    @property
    def effective_rank(self) -> int:
        if self.rank_mask.is_meta:  # counting from a config: nothing pruned yet
            return self.rank
        return int(self.rank_mask.sum())

    def masked_singular(self) -> torch.Tensor:
        return self.singular * self.rank_mask.to(self.singular.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = matmul_input(x, self.right)
        return ((x @ self.right.T) * self.masked_singular()) @ self.left.T

    def linear_map(self) -> LinearMap:
        """Δh = ΔW x with ΔW = P·diag(λ ⊙ m)·Q (no bias)."""
        return LinearMap((self.left * self.masked_singular()) @ self.right)

    def low_rank_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with Δh = B·A·x (PEFT interop): A = diag(λ)·Q, B = P, kept triplets only."""
        keep = self.rank_mask.nonzero().flatten()
        return self.masked_singular()[keep][:, None] * self.right[keep], self.left[:, keep]

    def lora_mismatch(self, options: SVDOptions) -> str | None:
        return None

    def orthogonality(self) -> torch.Tensor:
        """‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (the paper's R(P, Q))."""
        # outside the forward, where a sharded model holds only shards: the whole P and Q (identity unsharded)
        left_full, right_full = full(self.left), full(self.right)
        eye = torch.eye(self.rank, device=left_full.device, dtype=left_full.dtype)
        left = left_full.T @ left_full - eye
        right = right_full @ right_full.T - eye
        return (left ** 2).sum() + (right ** 2).sum()

    def regularization_loss(self) -> torch.Tensor | None:
        if self.orth_reg_weight == 0 or self.rank == 0:
            return None
        return self.orth_reg_weight * self.orthogonality()

    def pruned_parameters(self) -> dict[str, torch.Tensor]:
        """The kept triplets only: what is saved (pruned shapes); the dropped ones contribute exactly zero."""
        if self.effective_rank == self.rank:
            return {"left": self.left, "singular": self.singular, "right": self.right}
        keep = self.rank_mask.nonzero().flatten()
        return {"left": self.left[:, keep], "singular": self.singular[keep], "right": self.right[keep]}


def _key(p: "Placement") -> str:
    return f"{p.stack}.{p.layer}.{p.site}"


class SVDForm(Form):
    name = "svd"
    Options = SVDOptions
    sites = PROJECTION_SITES + (ALL_LINEAR,)
    insertions = ("parallel",)
    compositions = ("add", "scale")
    size_key = "init_r"
    size_companions = ("target_r",)

    def check(self, options: SVDOptions, where: str) -> None:
        if options.target_r > options.init_r:
            raise MethodConfigError(f"{where}: target_r {options.target_r} exceeds init_r {options.init_r}")
        if all(isinstance(v, float) for v in (options.tinit, options.tfinal)) and options.tinit + options.tfinal >= 1:
            raise MethodConfigError(f"{where}: tinit + tfinal must leave steps for the schedule (got "
                                    f"{options.tinit} + {options.tfinal} >= 1)")
        for key, rank in options.rank_pattern or ():
            if rank > options.init_r:
                raise MethodConfigError(f"{where}: rank_pattern['{key}'] must be an integer in 0..init_r "
                                        f"({options.init_r}), got {rank!r}")

    def to_yaml(self, options: SVDOptions) -> dict[str, Any]:
        out = super().to_yaml(options)
        if options.rank_pattern is not None:
            out["rank_pattern"] = dict(options.rank_pattern)
        return out

    def _ranks(self, spec: "ModuleSpec", placements: list["Placement"]) -> list[int]:
        pattern = spec.options.rank_pattern
        if pattern is None:
            return [spec.options.init_r] * len(placements)
        pattern = dict(pattern)
        known = sorted(_key(p) for p in placements)
        unknown = sorted(set(pattern) - set(known))
        if unknown:
            from ..errors import AttachError  # noqa: PLC0415 - the one error this layer raises about a model

            raise AttachError(f"module '{spec.name}': rank_pattern key '{unknown[0]}' matches no placement "
                              f"(keys are 'stack.layer.site', e.g. '{known[0]}')")
        return [pattern.get(_key(p), spec.options.init_r) for p in placements]

    def build(self, spec: "ModuleSpec", placements: list["Placement"], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        forms = [SVDDelta(spec.options, p.d_in, p.d_out, rank)
                 for p, rank in zip(placements, self._ranks(spec, placements))]
        slots = [Slot(spec, form, Composer(spec, p.d_in), p.site, p.chunk) for p, form in zip(placements, forms)]
        controllers = {}
        if spec.options.rank_pattern is None:  # still to be pruned: one allocator, one global budget
            allocator = RankAllocator(spec, {_key(p): form for p, form in zip(placements, forms)})
            controllers[f"unipelt_{spec.name}_rank_allocator"] = allocator
        return Built(slots, controllers=controllers)

    def count(self, spec: "ModuleSpec", placements: list["Placement"]) -> Counts:
        """P (d_out × r), λ (r), Q (r × d_in) per target matrix: r·(d_in + d_out + 1), plus the composer."""
        total = sum(rank * (p.d_in + p.d_out + 1) + Composer.parameter_count(spec, p.d_in)
                    for p, rank in zip(placements, self._ranks(spec, placements)))
        return Counts(added=total, trainable=total)


register(SVDForm())
