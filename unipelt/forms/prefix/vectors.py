"""The prefix functional form: l learned key and value vectors per attention layer (per key/value head).

Li & Liang train the prefix through a reparameterisation MLP shared by the layers of one kind of attention (encoder
self, decoder self, decoder cross: one MLP each); the MLP is a training aid,
so `fold()` replaces it by the plain vectors it produces (what gets saved and served, and what the paper's
parameter count covers).
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixReparam(nn.Module):
    """MLP P = W2·tanh(W1·E) producing the key/value prefixes of the sites of one attention kind of a module spec."""

    def __init__(self, length: int, d_model: int, mlp_dim: int, site_kv_dims: list[int],
                 input_std: float = 0.02) -> None:
        super().__init__()
        self.offsets = [0]  # site i's keys-then-values are rows offsets[i]:offsets[i + 1] of W2
        for kv_dim in site_kv_dims:
            self.offsets.append(self.offsets[-1] + 2 * kv_dim)
        # input_std: N(0, 0.02) by default, not nn.Embedding's N(0, 1) as in Li & Liang's and He et al.'s code: at the
        # GLUE setting's learning rate (3e-3) N(0, 1) inputs saturate the tanh MLP and MAM stays at chance; the MH PA
        # preset sets 1.0, whose ReLU sum over l near-identical vectors drowns the attention (docs/fidelity.md).
        self.embedding = nn.Parameter(torch.empty(length, d_model).normal_(std=input_std))
        self.hidden = nn.Linear(d_model, mlp_dim)
        self.out = nn.Linear(mlp_dim, self.offsets[-1])

    def site_prefix(self, index: int) -> torch.Tensor:
        """Flat [length, 2·kv_dim] keys-then-values of one site; only that site's rows of W2 are used."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        hidden = torch.tanh(self.hidden(self.embedding))
        return nn.functional.linear(hidden, self.out.weight[start:stop], self.out.bias[start:stop])


class Prefix(nn.Module):
    """The prefix of one attention module: keys and values shaped [kv_heads, length, head_dim]."""

    def __init__(self, length: int, kv_heads: int, head_dim: int, reparam: PrefixReparam | None = None,
                 site_index: int = 0) -> None:
        super().__init__()
        self.length, self.kv_heads, self.head_dim = length, kv_heads, head_dim
        # A plain list keeps the shared MLP out of this module's parameters (it is registered once, on the model).
        self._reparam = [reparam] if reparam is not None else []
        self.site_index = site_index
        if reparam is None:  # P-tuning v2's prefix is an nn.Embedding: N(0, 1)
            self.keys = nn.Parameter(torch.empty(kv_heads, length, head_dim).normal_(std=1.0))
            self.values = nn.Parameter(torch.empty(kv_heads, length, head_dim).normal_(std=1.0))

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._reparam:
            return self.keys, self.values
        flat = self._reparam[0].site_prefix(self.site_index)
        keys, values = flat.chunk(2, dim=-1)
        shape = (self.length, self.kv_heads, self.head_dim)
        return keys.reshape(shape).transpose(0, 1), values.reshape(shape).transpose(0, 1)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation by the vectors it currently produces (outputs unchanged)."""
        if not self._reparam:
            return
        keys, values = self.key_values()
        self._reparam.clear()
        self.keys = nn.Parameter(keys.detach().clone().contiguous())
        self.values = nn.Parameter(values.detach().clone().contiguous())
