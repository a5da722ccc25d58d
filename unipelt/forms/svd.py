"""The svd functional form (AdaLoRA, Zhang et al. 2023): Δh = P·diag(λ ⊙ m)·Q·x.

P (d_out × r) and Q (r × d_in) play the singular vectors, λ the singular values; m is the 0/1 mask the rank
allocator (unipelt/rank_allocator.py) sets when it prunes triplets (P[:, i], λ_i, Q[i, :]) to the budget. As in
the paper, λ starts at zero (the module starts as the identity) and P, Q are Gaussian; the orthogonal
regulariser γ·(‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F) keeps P and Q near-orthogonal so that λ stays a faithful importance.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import ModuleSpec
from .bottleneck import matmul_input


class SVDDelta(nn.Module):
    """One target matrix's update in SVD form, with a rank mask and its orthogonal regulariser."""

    def __init__(self, spec: ModuleSpec, d_in: int, d_out: int, rank: int) -> None:
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

    def linear_delta(self) -> tuple[torch.Tensor, None]:
        """(ΔW, None) with Δh = ΔW x: ΔW = P·diag(λ ⊙ m)·Q (no bias)."""
        return (self.left * self.masked_singular()) @ self.right, None

    def orthogonality(self) -> torch.Tensor:
        """‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (the paper's R(P, Q))."""
        eye = torch.eye(self.rank, device=self.left.device, dtype=self.left.dtype)
        left = self.left.T @ self.left - eye
        right = self.right @ self.right.T - eye
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
