"""The prompt functional form: l virtual token embeddings inserted into the input sequence.

Prompt tuning (Lester et al. 2021) trains the l vectors directly. P-tuning (Liu et al. 2021) trains them through a
prompt encoder (a bidirectional LSTM followed by an MLP, or an MLP alone) that couples the virtual tokens; like the
prefix MLP, the encoder is a training aid: `fold()` replaces it by the vectors it produces, which is what is saved
and served.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """P-tuning's re-parameterisation of the virtual tokens: [l, d] → [l, d], as THUDM/P-tuning's PromptEncoder.

    lstm: a 2-layer bidirectional LSTM over the l inputs, h/2 per direction (h in all, h = d by default), then
          ReLU MLP h → h → d.
    mlp:  ReLU MLP d → h → d applied to each input."""

    def __init__(self, kind: str, d_model: int, hidden: int) -> None:
        super().__init__()
        self.lstm = None
        width = d_model
        if kind == "lstm":
            per_direction = max(1, hidden // 2)
            self.lstm = nn.LSTM(d_model, per_direction, num_layers=2, bidirectional=True, batch_first=True)
            width = 2 * per_direction
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, d_model))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.lstm is not None:
            inputs = self.lstm(inputs.unsqueeze(0))[0].squeeze(0)
        return self.mlp(inputs)


class VirtualTokens(nn.Module):
    """The l virtual token embeddings [l, d]: `embedding` itself, or the prompt encoder's output for it."""

    def __init__(self, init_vectors: torch.Tensor, encoder: str = "none", encoder_dim: int | None = None) -> None:
        super().__init__()
        length, d_model = init_vectors.shape
        self.length, self.d_model = length, d_model
        self.embedding = nn.Parameter(init_vectors.detach().clone())
        self.encoder = None if encoder == "none" else PromptEncoder(encoder, d_model, encoder_dim or d_model)

    def vectors(self) -> torch.Tensor:
        if self.encoder is None:
            return self.embedding
        return self.encoder(self.embedding).to(self.embedding.dtype)

    def reparam_count(self) -> int:
        if self.encoder is None:
            return 0
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the encoder by the vectors it currently produces (outputs unchanged)."""
        if self.encoder is None:
            return
        vectors = self.vectors().detach().clone().contiguous()
        self.encoder = None
        self.embedding = nn.Parameter(vectors)


def initial_vectors(init: str, length: int, embed: nn.Module, vocab_size: int, ids: tuple[int, ...] | None,
                    like: torch.Tensor) -> torch.Tensor:
    """Starting values: uniform in [-0.5, 0.5] (random, Lester et al.), embeddings of tokens drawn uniformly from
    the vocabulary (vocab), or of `ids` repeated to fill l (text). `embed` is the model's own token embedding, so
    scaled embeddings (BART) come out in the space the inputs live in."""
    d_model = like.shape[-1]
    if init == "random":
        return torch.empty(length, d_model, dtype=like.dtype, device=like.device).uniform_(-0.5, 0.5)
    if init == "vocab":
        token_ids = torch.randint(0, vocab_size, (length,))
    else:
        assert ids, "init 'text' needs token ids (resolved before building)"
        repeats = -(-length // len(ids))
        token_ids = torch.tensor((list(ids) * repeats)[:length])
    with torch.no_grad():
        return embed(token_ids.to(like.device)).to(like.dtype)
