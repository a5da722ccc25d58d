"""The svd functional form (AdaLoRA, Zhang et al. 2023): Δh = s·P·diag(λ)·Q·x, s = alpha / init_r.

P (d_out × r) and Q (r × d_in) play the singular vectors, λ the singular values. As in the reference code
(QingruZhang/AdaLoRA loralib/adalora.py, and PEFT), λ starts at zero, P and Q are N(0, 0.02), and the rank
allocator (unipelt/rank_allocator.py) prunes a triplet (P[:, i], λ_i, Q[i, :]) by zeroing λ_i alone: λ_i keeps its
gradient, so a triplet pruned at one masking step can come back at the next. `rank_mask` records the allocator's
last decision; only once the pattern is final (`mask_is_final`, the last t_f steps and after) does the forward
multiply by it, and only then do saving, export and counting drop the pruned triplets.

The orthogonal regulariser of the reference is γ times the mean, over all P and Q matrices of one method module,
of the unsquared ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (`orthogonality_norms` here, averaged by `OrthogonalRegulariser`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import ModuleSpec
from .bottleneck import matmul_input


class SVDDelta(nn.Module):
    """One target matrix's update in SVD form, with the allocator's rank mask."""

    def __init__(self, spec: ModuleSpec, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.empty(d_out, rank).normal_(std=0.02))  # P
        self.singular = nn.Parameter(torch.zeros(rank))  # λ
        self.right = nn.Parameter(torch.empty(rank, d_in).normal_(std=0.02))  # Q
        # Not persistent: the mask is an allocator decision, saved as the pruned shapes (rank_pattern) instead.
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool), persistent=False)
        self.mask_is_final = False

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
        self.singular.masked_fill_(~self.rank_mask, 0.0)
        self.mask_is_final = self.mask_is_final or final

    def masked_singular(self) -> torch.Tensor:
        if not self.mask_is_final:
            return self.singular
        return self.singular * self.rank_mask.to(self.singular.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = matmul_input(x, self.right)
        return ((x @ self.right.T) * self.masked_singular()) @ self.left.T

    def linear_delta(self) -> tuple[torch.Tensor, None]:
        """(ΔW, None) with Δh = ΔW x: ΔW = P·diag(λ)·Q over the triplets that can act (no bias)."""
        return (self.left * self.masked_singular()) @ self.right, None

    def orthogonality_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖PᵀP − I‖_F, ‖QQᵀ − I‖_F), unsquared as in the reference code."""
        eye = torch.eye(self.rank, device=self.left.device, dtype=self.left.dtype)
        left = torch.linalg.matrix_norm(self.left.T @ self.left - eye)
        right = torch.linalg.matrix_norm(self.right @ self.right.T - eye)
        return left, right

    def pruned_parameters(self) -> dict[str, torch.Tensor]:
        """The triplets that can act: what is saved (pruned shapes once the pattern is final)."""
        if self.effective_rank == self.rank:
            return {"left": self.left, "singular": self.singular, "right": self.right}
        keep = self.kept_indices()
        return {"left": self.left[:, keep], "singular": self.singular[keep], "right": self.right[keep]}


class OrthogonalRegulariser:
    """γ · mean over the 2·n matrices (P and Q of each of n svd forms) of their orthogonality norm (Zhang et al.'s
    R(P, Q) as their code and PEFT compute it). One per svd method module; reached through unipelt.optim."""

    def __init__(self, weight: float, forms: list[SVDDelta]) -> None:
        self.weight = weight
        self.forms = forms

    def regularization_loss(self) -> torch.Tensor | None:
        if self.weight == 0 or not self.forms:
            return None
        total = sum(sum(form.orthogonality_norms()) for form in self.forms)
        return self.weight * total / (2 * len(self.forms))
