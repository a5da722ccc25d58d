"""Where every position of a prompt-widened sequence comes from, and moving tensors between the input's
positions and the widened ones.

Each example is laid out as [left padding] + the template around its real tokens + [right padding]: virtual
tokens sit inside the real tokens, so left and right padding both work and the widened attention mask is the
input's with ones inserted at the first real position.

Rows may have templates of their own (a mixed batch: rows of several prompt adapters, and rows of none): each row
is laid out with its template, and a row that inserts fewer positions than the longest is padded at its right end
(masked, label -100). Its positions, relative distances and causal order are then those it has alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    index: torch.Tensor  # [B, W]: j < T is input position j; T + k is inserted vector k; T + E is padding
    real: torch.Tensor  # [B, T]: widened position of input position j
    after: torch.Tensor  # [B, T]: widened position whose causal output predicts what follows input position j
    blocks: list[tuple[int, int]]  # per example: (first real position s, number of real positions n)
    width: int
    extra: list[int] | None = None  # per example: positions it inserts (None: every row the template's count)
    padded: bool = False  # some rows are padded at their right end (index T + E)


def inserted_count(template: tuple | None) -> int:
    """Positions a template inserts per example (virtual tokens and anchors); 0 for no template."""
    if template is None:
        return 0
    return sum(item[1] for item in template if item[0] == "prompt") + \
        sum(len(item[1]) for item in template if item[0] == "anchor")


def plan(template: tuple | list, mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> Layout:
    """Lay out each example: [left padding] + template around its real tokens + [right padding]. `template`: one
    for every row, or a list of one per row (None: the row inserts nothing), shorter rows padded at the end."""
    templates = list(template) if isinstance(template, list) else [template] * batch
    extras = [inserted_count(t) for t in templates]
    most = max(extras, default=0)
    if mask is None:
        spans = [(0, length)] * batch
    else:
        keep = mask.ne(0)
        first = keep.int().argmax(dim=1).tolist()
        last = (length - 1 - keep.flip(1).int().argmax(dim=1)).tolist()
        spans = [(f, l + 1) if has else (0, 0) for f, l, has in zip(first, last, keep.any(dim=1).tolist())]
    index, real, after, blocks = [], [], [], []
    for (start, stop), template, extra in zip(spans, templates, extras):
        source = list(range(start))
        n_virtual = extra - sum(len(item[1]) for item in template or () if item[0] == "anchor")
        virtual, anchor = length, length + n_virtual
        for item in template if template is not None else (("input",),):
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
        source.extend([length + most] * (most - extra))  # right-end padding of a row that inserts fewer
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
    return Layout(as_tensor(index), as_tensor(real), as_tensor(after), blocks, length + most, extras,
                  any(extra != most for extra in extras))


def widen(x: torch.Tensor, layout: Layout, fill: torch.Tensor | float | int, pad: float | int = 0) -> torch.Tensor:
    """x [B, T, ...] → [B, W, ...]: inputs at their widened positions, `fill` inserted (a value, [E, ...] for every
    row, or [B, E, ...] per row), `pad` at a padded row's right end."""
    batch = layout.index.shape[0]
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    n_extra = layout.width - x.shape[1]
    if isinstance(fill, torch.Tensor):
        fill = fill.to(dtype=x.dtype, device=x.device)
        extra = fill.unsqueeze(0).expand(batch, *fill.shape) if fill.dim() == x.dim() - 1 else fill
    else:
        extra = torch.full((batch, n_extra, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    parts = [x, extra]
    if layout.padded:
        parts.append(torch.full((batch, 1, *x.shape[2:]), pad, dtype=x.dtype, device=x.device))
    source = torch.cat(parts, dim=1)
    index = layout.index.view(batch, layout.width, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(source, 1, index)


def align(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, W, ...] → [B, T, ...]: the widened positions named by `positions` ([B, T])."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index.to(x.device))


def widen_positions(positions: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Caller-given position ids: each example's widened real block counts on from its first real position."""
    out = widen(positions, layout, 0).clone()
    extras = layout.extra or [layout.width - positions.shape[-1]] * len(layout.blocks)
    for row, ((start, count), extra) in enumerate(zip(layout.blocks, extras)):
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
