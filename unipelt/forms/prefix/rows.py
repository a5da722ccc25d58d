"""Rows of one attention call that different prefixes act on (a mixed batch, a BatchSplit).

Each PrefixSlot with a Route acts on its rows only; a slot without one acts on every row. The rows are grouped by
the set of slots acting on them, and the attention runs once per group on that group's rows (query, key, value,
mask and every per-row keyword sliced), so that a row sees exactly the keys and values it would see alone with
its adapters: no other adapter's prefix joins its softmax. A call whose rows all see the same slots runs as one
group, unsliced (what a model with one adapter runs).
"""

from __future__ import annotations

from typing import Any

import torch


def row_groups(slots: list[Any], batch: int) -> list[tuple[torch.Tensor | None, list[Any]]]:
    """(rows, the slots acting on them) for every distinct set of slots, in order of first row; rows None when
    one set covers the whole call."""
    routed = [(index, slot.route.rows_at(batch)) for index, slot in enumerate(slots) if slot.route is not None]
    routed = [(index, rows) for index, rows in routed if rows is not None]
    if not routed:
        return [(None, slots)]
    codes = torch.zeros(batch, dtype=torch.long)
    for bit, (index, rows) in enumerate(routed):
        codes.index_add_(0, rows.cpu(), torch.full((rows.numel(),), 1 << bit, dtype=torch.long))
    every = {index for index, _ in routed}
    groups = []
    for code in dict.fromkeys(codes.tolist()):
        acting = {index for bit, (index, _) in enumerate(routed) if code >> bit & 1}
        chosen = [slot for index, slot in enumerate(slots) if index in acting or index not in every]
        rows = torch.nonzero(codes == code).reshape(-1)
        groups.append((rows, chosen))
    if len(groups) == 1:
        return [(None, groups[0][1])]
    return groups


def take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """A per-row tensor (first dimension `batch`) cut to `rows`; anything else (broadcast over rows: a T5
    position bias [1, ...], a causal mask [1, 1, q, k], a scalar) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
        return value.index_select(0, rows.to(value.device))
    return value


__all__ = ["row_groups", "take_rows"]
