"""The Δh module of the svd form (AdaLoRA): P·diag(λ)·Q with the rank allocator's mask, and the orthogonal
regulariser over one method module's P and Q matrices. See the package docstring (unipelt/forms/svd/__init__.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...full_tensor import full, laid_out_like
from ...slot import Delta, LinearMap
from ..bottleneck import matmul_input


class SVDDelta(Delta):
    """One target matrix's update in SVD form, with the allocator's rank mask."""

    def __init__(self, spec: Any, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.empty(d_out, rank).normal_(std=0.02))  # P
        self.singular = nn.Parameter(torch.zeros(rank))  # λ
        self.right = nn.Parameter(torch.empty(rank, d_in).normal_(std=0.02))  # Q
        # Not persistent: the mask is an allocator decision, saved as the pruned shapes (rank_pattern) instead.
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool), persistent=False)
        self.mask_is_final = False
        self.drive_watch = None  # set on one delta per module spec by its rank allocator (watch.py)

    @property
    def rank(self) -> int:
        return self.singular.shape[0]

    @property
    def allocated_rank(self) -> int:
        """Triplets the allocator kept at its last masking step."""
        if self.rank_mask.is_meta:  # counting from a config: nothing pruned yet
            return self.rank
        return int(self.rank_mask.sum())

    @property
    def effective_rank(self) -> int:
        """Triplets that can still act: all of them until the pattern is final, then the kept ones."""
        return self.allocated_rank if self.mask_is_final else self.rank

    def kept_indices(self) -> torch.Tensor:
        if not self.mask_is_final:
            return torch.arange(self.rank, device=self.singular.device)
        return self.rank_mask.nonzero().flatten()

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor, final: bool = False) -> None:
        """The allocator's decision: record it and zero the pruned λ (P and Q stay, as in the reference)."""
        self.rank_mask.copy_(keep.to(self.rank_mask.device))
        self.singular.masked_fill_(laid_out_like(~self.rank_mask, self.singular), 0.0)
        self.mask_is_final = self.mask_is_final or final

    def masked_singular(self) -> torch.Tensor:
        if not self.mask_is_final:
            return self.singular
        return self.singular * self.rank_mask.to(self.singular.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self.drive_watch is not None and self.training and \
                torch.is_grad_enabled():
            self.drive_watch.forward_check(self)
        x = matmul_input(x, self.right)
        return ((x @ self.right.T) * self.masked_singular()) @ self.left.T

    def linear_map(self) -> LinearMap:
        """Δh = ΔW x with ΔW = P·diag(λ ⊙ m)·Q (no bias)."""
        return LinearMap((self.left * self.masked_singular()) @ self.right)

    def orthogonality_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖PᵀP − I‖_F, ‖QQᵀ − I‖_F), unsquared as in the reference code."""
        # outside the forward, where a sharded model holds only shards: the whole P and Q (identity unsharded)
        whole_left, whole_right = full(self.left), full(self.right)
        eye = torch.eye(self.rank, device=whole_left.device, dtype=whole_left.dtype)
        left = torch.linalg.matrix_norm(whole_left.T @ whole_left - eye)
        right = torch.linalg.matrix_norm(whole_right @ whole_right.T - eye)
        return left, right

    def pruned_parameters(self) -> dict[str, torch.Tensor]:
        """The triplets that can act: what is saved (pruned shapes once the pattern is final)."""
        if self.effective_rank == self.rank:
            return {"left": self.left, "singular": self.singular, "right": self.right}
        keep = self.kept_indices()
        return {"left": self.left[:, keep], "singular": self.singular[keep], "right": self.right[keep]}



    def low_rank_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with Δh = B·A·x: A = diag(λ ⊙ m)·Q, B = P, kept triplets only (what export_peft writes)."""
        keep = self.kept_indices()
        return self.masked_singular()[keep][:, None] * self.right[keep], self.left[:, keep]


class OrthogonalRegulariser:
    """γ · mean over the 2·n matrices (P and Q of each of n svd forms) of their orthogonality norm (Zhang et al.'s
    R(P, Q) as their code and PEFT compute it). One per svd method module; reached through unipelt.optim."""

    def __init__(self, weight: float, forms: list[SVDDelta]) -> None:
        self.weight = weight
        self.forms = forms
        self.calls = 0  # how often a training loop asked for it (the allocator's watch checks it is driven)

    def regularization_loss(self) -> torch.Tensor | None:
        self.calls += 1
        if self.weight == 0 or not self.forms:
            return None
        total = sum(sum(form.orthogonality_norms()) for form in self.forms)
        return self.weight * total / (2 * len(self.forms))


__all__ = ["OrthogonalRegulariser", "SVDDelta"]
