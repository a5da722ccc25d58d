"""Where every position of a prompt-widened sequence comes from, and moving tensors between the input's
positions and the widened ones.

Each example is laid out as [left padding] + the template around its real tokens + [right padding]: virtual
tokens sit inside the real tokens, so left and right padding both work and the widened attention mask is the
input's with ones inserted at the first real position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    index: torch.Tensor  # [B, W]: j < T is input position j; T + k is inserted vector k
    real: torch.Tensor  # [B, T]: widened position of input position j
    after: torch.Tensor  # [B, T]: widened position whose causal output predicts what follows input position j
    blocks: list[tuple[int, int]]  # per example: (first real position s, number of real positions n)
    width: int


def plan(template: tuple, mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> Layout:
    """Lay out each example: [left padding] + template around its real tokens + [right padding]."""
    n_virtual = sum(item[1] for item in template if item[0] == "prompt")
    extra = n_virtual + sum(len(item[1]) for item in template if item[0] == "anchor")
    if mask is None:
        spans = [(0, length)] * batch
    else:
        keep = mask.ne(0)
        first = keep.int().argmax(dim=1).tolist()
        last = (length - 1 - keep.flip(1).int().argmax(dim=1)).tolist()
        spans = [(f, l + 1) if has else (0, 0) for f, l, has in zip(first, last, keep.any(dim=1).tolist())]
    index, real, after, blocks = [], [], [], []
    for start, stop in spans:
        source = list(range(start))
        virtual, anchor = length, length + n_virtual
        for item in template:
            kind = item[0]
            if kind == "input":
                source.extend(range(start, stop))
            elif kind == "input_first":
                source.extend(range(start, min(start + 1, stop)))
            elif kind == "input_rest":
                source.extend(range(min(start + 1, stop), stop))
            elif kind == "prompt":
                source.extend(range(virtual, virtual + item[1]))
                virtual += item[1]
            else:
                source.extend(range(anchor, anchor + len(item[1])))
                anchor += len(item[1])
        source.extend(range(stop, length))
        where = [0] * length
        for w, j in enumerate(source):
            if j < length:
                where[j] = w
        nxt = list(where)
        for j in range(start, stop - 1):
            nxt[j] = where[j + 1] - 1
        if stop > start:
            nxt[stop - 1] = stop + extra - 1
        index.append(source)
        real.append(where)
        after.append(nxt)
        blocks.append((start, stop - start))
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    return Layout(as_tensor(index), as_tensor(real), as_tensor(after), blocks, length + extra)


def widen(x: torch.Tensor, layout: Layout, fill: torch.Tensor | float | int) -> torch.Tensor:
    """x [B, T, ...] → [B, W, ...]: inputs at their widened positions, `fill` (a value, or [extra, ...]) inserted."""
    batch = layout.index.shape[0]
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    n_extra = layout.width - x.shape[1]
    if isinstance(fill, torch.Tensor):
        extra = fill.to(dtype=x.dtype, device=x.device).unsqueeze(0).expand(batch, *fill.shape)
    else:
        extra = torch.full((batch, n_extra, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    source = torch.cat([x, extra], dim=1)
    index = layout.index.view(batch, layout.width, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(source, 1, index)


def align(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, W, ...] → [B, T, ...]: the widened positions named by `positions` ([B, T])."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index.to(x.device))


def widen_positions(positions: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Caller-given position ids: each example's widened real block counts on from its first real position."""
    out = widen(positions, layout, 0).clone()
    extra = layout.width - positions.shape[-1]
    for row, (start, count) in enumerate(layout.blocks):
        first = positions[min(row, positions.shape[0] - 1), start] if count else 0
        out[row, start:start + count + extra] = first + torch.arange(count + extra, device=out.device)
    return out


__all__ = ["Layout", "plan", "widen", "align", "widen_positions"]


def first_real_order(layout: Layout) -> torch.Tensor:
    """[B, W] widened positions with, per example, position 0 and the first real token's position swapped, so that
    `align(hidden, order)` puts [CLS] / <s> where a head reads position 0 (the identity if it is already there)."""
    batch = layout.real.shape[0]
    rows = torch.arange(batch, device=layout.real.device)
    first = torch.tensor([start for start, _ in layout.blocks], dtype=torch.long, device=layout.real.device)
    cls = layout.real[rows, first]
    order = torch.arange(layout.width, device=layout.real.device).repeat(batch, 1)
    order[rows, cls] = 0
    order[:, 0] = cls
    return order
