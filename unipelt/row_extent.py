"""How many positions of each row are its own, while a mixed batch pads rows past the length they have alone.

Rows of a mixed batch carrying prompts of different lengths are padded at their right end to the longest
(unipelt/forms/prompt). Attention masks the padding; the one per-row reduction over positions that does not read a
mask, the sigmoid gate's mean over tokens (unipelt.compose, as Mao et al.'s code: the row's own padding included),
must not count it either. The prompt hooks open an extent around the forward of the widened sequence (a decoder's
base model, an encoder) and close it after; within it a [batch, width, ...] tensor's row i has `widths[i]` own
positions.
"""

from __future__ import annotations

import torch

_OPEN: list[tuple[int, torch.Tensor]] = []  # (padded width, [batch] own widths), innermost last


def open_extent(width: int, widths: torch.Tensor) -> None:
    _OPEN.append((width, widths))


def close_extent() -> None:
    if _OPEN:
        _OPEN.pop()


def narrow(rows: torch.Tensor, batch: int) -> bool:
    """Within a sub-batch of `rows` of a call of `batch` rows (a Route's rows, a prefix's row group): open the
    extent of those rows; True when one was opened (close it with close_extent), False when none is open."""
    if not _OPEN or _OPEN[-1][1].shape[0] != batch:
        return False
    width, widths = _OPEN[-1]
    _OPEN.append((width, widths.index_select(0, rows.to(widths.device))))
    return True


def own_widths(x: torch.Tensor) -> torch.Tensor | None:
    """[batch] own positions of the rows of x [batch, positions, ...] while an extent for its shape is open (None:
    every position is the row's own)."""
    if not _OPEN or x.dim() < 3:
        return None
    width, widths = _OPEN[-1]
    if x.shape[-2] != width or x.shape[0] != widths.shape[0]:
        return None
    return widths.to(x.device)


__all__ = ["close_extent", "narrow", "open_extent", "own_widths"]
