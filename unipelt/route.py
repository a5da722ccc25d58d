"""How a slot acts under a composition block or a mixed batch: on some rows only (a BatchSplit's share, a mixed
batch's rows of its adapter), or reading the h that every member of a Parallel / Average block reads. Set on each
slot by unipelt.adapter_set; applied by the slot's hooks (unipelt.slot)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import AttachError
from .row_extent import close_extent, narrow


class SharedInput:
    """The h that every member of a Parallel / Average block reads at one site in one forward call: the first
    member's hook stores it, the last one clears it. `members`: the slots of the block at this site (filled by
    unipelt.adapter_set while it plans the routes)."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.members: list = []


class Route:
    """How a slot acts under a composition block or a mixed batch (None on a slot: on every row, reading h).

    rows: the batch rows it acts on (a BatchSplit's share, a mixed batch's rows of this adapter), or None for all;
    batch: the batch size those rows assume (checked at every call); shared / first / last / weight: membership
    of a Parallel (weight 1) or Average block, whose members all read the h the first one saw and add
    weight·(its composed output − that h)."""

    def __init__(self, rows: torch.Tensor | None = None, batch: int | None = None,
                 shared: SharedInput | None = None, first: bool = False, last: bool = False,
                 weight: float = 1.0, what: str = "") -> None:
        self.rows, self.batch, self.shared = rows, batch, shared
        self.first, self.last, self.weight, self.what = first, last, weight, what
        self._expanded: dict[tuple, tuple[torch.Tensor | None, bool]] = {}

    def rows_at(self, size: int) -> torch.Tensor | None:
        """The rows this route acts on in a call of `size` rows (None: all of them). generate() repeats each row
        for beams / return sequences (repeat_interleave), so k·batch rows are row i's k copies in a row."""
        return self._rows(size, None)[0]

    def _rows(self, size: int, device: torch.device | None) -> tuple[torch.Tensor | None, bool]:
        """(rows_at(size) on `device`, whether they are every row of the call in order), kept per size and
        device: a route is asked at every hooked call of every forward."""
        key = (size, device)
        known = self._expanded.get(key)
        if known is not None:
            return known
        if self.rows is None or self.batch is None or size == self.batch:
            if self.batch is not None and size != self.batch and self.rows is None:
                raise AttachError(f"{self.what}: set for a batch of {self.batch} rows, got {size} rows")
            rows = self.rows
        elif size % self.batch:
            raise AttachError(f"{self.what}: set for a batch of {self.batch} rows, got {size} rows")
        else:
            k = size // self.batch
            rows = (self.rows[:, None] * k + torch.arange(k)).reshape(-1)
        if rows is not None and device is not None:
            rows = rows.to(device)
        every = rows is not None and rows.numel() == size and bool(torch.equal(rows.cpu(), torch.arange(size)))
        self._expanded[key] = (rows, every)
        return rows, every

    def apply(self, slot: Any, h: torch.Tensor, x: torch.Tensor | None, compose: Any = None) -> torch.Tensor:
        """h with the slot composed in on this route's rows; `compose(h, x)` (default slot.composed) composes the
        slot into the rows it is given."""
        rows, every = self._rows(h.shape[0], h.device)
        base = h
        if self.shared is not None:
            if self.first:
                self.shared.h = h
            base = self.shared.h
            if base is None or base.shape != h.shape:
                raise AttachError(f"{self.what}: the members' shared input is missing at this site")
            if self.last:
                self.shared.h = None
        compose = slot.composed if compose is None else compose
        if rows is None:
            out = compose(base, x)
            return out if self.shared is None else h + self.weight * (out - base)
        if rows.numel() == 0:
            return h
        if every and self.shared is None:
            return compose(h, x)
        narrowed = narrow(rows, h.shape[0])  # a gate's mean over these rows' own positions (row_extent)
        try:
            if self.shared is None and slot._owns_output and compose == slot.composed:
                added = slot.add_into_rows(h, x, rows)  # h[rows] += s·Δh in place (a fixed factor), or None
                if added is not None:
                    return added
            sub_base = base.index_select(0, rows)
            out = compose(sub_base, None if x is None else x.index_select(0, rows))
        finally:
            if narrowed:
                close_extent()
        if self.shared is not None:
            out = h.index_select(0, rows) + self.weight * (out - sub_base)
        elif slot._owns_output:  # a projection's fresh output, held by nobody else: its rows are written in place
            return h.index_copy_(0, rows, out.to(h.dtype))
        return h.index_copy(0, rows, out.to(h.dtype))


__all__ = ["Route", "SharedInput"]
