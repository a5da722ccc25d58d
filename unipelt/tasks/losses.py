"""Token cross-entropy as transformers computes it, with optional label smoothing (the Trainer's
`label_smoothing_factor`, which He et al.'s XSum and en-ro scripts set to 0.1): (1 - e) * NLL + e * the mean over the
vocabulary of -log p, over the labelled tokens (-100 ignored). torch's cross_entropy(label_smoothing=e) is that same
quantity. The training loop uses it for label smoothing, a task's evaluation for the `loss` metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.0, causal: bool = False,
                        reduction: str = "mean") -> torch.Tensor:
    """logits (..., V) and labels (...); causal: a decoder-only LM, whose position t predicts label t + 1."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=epsilon, reduction=reduction)


__all__ = ["token_cross_entropy"]
