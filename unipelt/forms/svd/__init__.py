"""The svd functional form (AdaLoRA, Zhang et al. 2023): Δh = s·P·diag(λ)·Q·x, s = alpha / init_r.

P (d_out × r) and Q (r × d_in) play the singular vectors, λ the singular values. As in the reference code
(QingruZhang/AdaLoRA loralib/adalora.py, and PEFT), λ starts at zero, P and Q are N(0, 0.02), and the rank
allocator (allocator.py here) prunes a triplet (P[:, i], λ_i, Q[i, :]) by zeroing λ_i alone: λ_i keeps its
gradient, so a triplet pruned at one masking step can come back at the next. `rank_mask` records the allocator's
last decision; only once the pattern is final (`mask_is_final`, the last t_f steps and after) does the forward
multiply by it, and only then do saving, export and counting drop the pruned triplets.

The orthogonal regulariser of the reference is γ times the mean, over all P and Q matrices of one method module,
of the unsquared ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (`orthogonality_norms` here, averaged by `OrthogonalRegulariser`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from ...compose import Composer
from ...errors import AttachError, MethodConfigError
from ...module_spec import ModuleSpec, Placement
from ...sites.names import ALL_LINEAR, PROJECTION_SITES
from ...slot import Slot
from ...spec_values import positive_float_value, positive_int_value, probability_value
from ..base import AlphaScaledForm, Built, Counts, PeftLora, option, optional, register
from .allocator import RankAllocator
from .delta import OrthogonalRegulariser, SVDDelta


def _schedule_point(value: Any, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or (
            isinstance(value, float) and not value < 1):
        key = where.rpartition(": ")[2]
        raise MethodConfigError(f"{where.rpartition(': ')[0]}: {key} must be a step count (int >= 0) or a fraction "
                                f"of the run (float in [0, 1)), got {value!r}")
    return value


def _non_negative(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
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
    tfinal: int | float = option(0.5, "final fine-tuning at the target budget: steps or fraction", _schedule_point)
    delta_t: int = option(100, "steps between two budget updates", positive_int_value)
    beta1: float = option(0.85, "smoothing of the sensitivity", probability_value)
    beta2: float = option(0.85, "smoothing of the uncertainty", probability_value)
    orth_reg_weight: float = option(0.1, "weight γ of the orthogonal regulariser", _non_negative)
    rank_pattern: tuple[tuple[str, int], ...] | None = option(
        None, "pruned ranks 'stack.layer.site' -> r of a saved adapter (written by save_adapter)", _rank_pattern)
    alpha: float | None = option(None, "sets the scale to alpha / init_r (the reference's lora_alpha / ranknum)",
                                 optional(positive_float_value))


def _key(p: "Placement") -> str:
    return f"{p.stack}.{p.layer}.{p.site}"


class SVDForm(AlphaScaledForm):
    name = "svd"
    Options = SVDOptions
    sites = PROJECTION_SITES + (ALL_LINEAR,)
    insertions = ("parallel",)
    compositions = ("add", "scale")
    size_key = "init_r"
    size_companions = ("target_r",)
    solved_keys = ("rank_pattern",)  # the allocator's pruned ranks (save_adapter writes them into the method)

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
            raise AttachError(f"module '{spec.name}': rank_pattern key '{unknown[0]}' matches no placement "
                              f"(keys are 'stack.layer.site', e.g. '{known[0]}')")
        return [pattern.get(_key(p), spec.options.init_r) for p in placements]

    def build(self, spec: "ModuleSpec", placements: list["Placement"], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        forms = [SVDDelta(spec.options, p.d_in, p.d_out, rank)
                 for p, rank in zip(placements, self._ranks(spec, placements))]
        slots = [Slot(spec, form, Composer(spec, p.d_in), p.site, p.chunk) for p, form in zip(placements, forms)]
        # The orthogonal regulariser is a mean over all the module's matrices, so it sees them all; while the ranks
        # are still to be pruned (no rank_pattern yet), one allocator keeps one global budget.
        regulariser = OrthogonalRegulariser(spec.options.orth_reg_weight, forms)
        controllers: dict[str, Any] = {f"unipelt_{spec.name}_orthogonal_regulariser": regulariser}
        if spec.options.rank_pattern is None:
            allocator = RankAllocator(spec, {_key(p): form for p, form in zip(placements, forms)}, regulariser)
            controllers[f"unipelt_{spec.name}_rank_allocator"] = allocator
        return Built(slots, controllers=controllers)

    def count(self, spec: "ModuleSpec", placements: list["Placement"]) -> Counts:
        """P (d_out × r), λ (r), Q (r × d_in) per target matrix: r·(d_in + d_out + 1), plus the composer."""
        total = sum(rank * (p.d_in + p.d_out + 1) + Composer.parameter_count(spec, p.d_in)
                    for p, rank in zip(placements, self._ranks(spec, placements)))
        return Counts(added=total, trainable=total)


    def merges(self, spec: ModuleSpec) -> bool:
        return True  # parallel, linear, at projections only, composed by a constant: always folds

    def starts_as_identity(self, spec: ModuleSpec) -> bool:
        return True  # λ starts at zero

    def attached_counts(self, deltas: list[nn.Module]) -> dict[str, int]:
        """The current effective total rank over the module's target matrices (what is saved and served)."""
        return {"svd_rank": sum(delta.effective_rank for delta in deltas)}

    def peft_lora_export(self, slot: Slot) -> PeftLora | str:
        """A = diag(λ ⊙ m)·Q, B = P over the kept triplets; outputs agree up to float rounding (λ multiplied in
        first). AdaLoRA's file is read back as a plain LoRA (bottleneck), so this form reads no PEFT files."""
        a, b = slot.delta_module.low_rank_pair()
        factor = slot.composer.merge_factor()
        return PeftLora(a=a, b=b, scale=float(factor))


register(SVDForm())
