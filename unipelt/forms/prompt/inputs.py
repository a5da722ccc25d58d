"""What a forward call's inputs become when prompts are inserted (hooks.py calls these from its hooks): the widened
embeddings, mask, token types and positions of an uncached call; the widened mask and shifted positions of a call
whose cache (or encoder output) already holds the prompt, for one prompt on every row or each row its own
(rows.py; a mixed batch's rows padded at their right end to the longest prompt)."""

from __future__ import annotations

import torch

from ... import compat
from ...errors import AttachError
from .layout import Layout, widen, widen_positions
from .rows import Serving, serving


def check_mask(mask: torch.Tensor | None) -> None:
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"prompt: attention_mask must be 2-D [batch, length] to insert virtual tokens, "
                         f"got shape {tuple(mask.shape)}")


def batch_of(kw: dict) -> int | None:
    source = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    return None if source is None else int(source.shape[0])


def serving_of(slot: "PromptSlot", kw: dict, batch: int | None = None) -> Serving | None:
    batch = batch_of(kw) if batch is None else batch
    return None if batch is None else serving(slot, batch)


def widen_inputs(serve: Serving, kw: dict) -> Layout | None:
    """Insert the prompt(s) into kw in place; None when there is nothing to do (no input, or both kinds given)."""
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    if (ids is None) == (embeds is None):
        return None  # the model raises its own error for both / neither
    if embeds is None:
        embeds = serve.leader.embed(ids)
    mask = kw.get("attention_mask")
    check_mask(mask)
    if mask is None and not serve.single:  # rows padded to the longest prompt need a mask for their padding
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    layout = serve.plan(mask, embeds.shape[0], embeds.shape[1], embeds.device)
    kw["inputs_embeds"] = widen(embeds, layout, serve.inserted(embeds))
    kw["input_ids"] = None
    if mask is not None:
        kw["attention_mask"] = widen(mask, layout, 1)
    if kw.get("token_type_ids") is not None:  # inserted positions get token type 0
        kw["token_type_ids"] = widen(kw["token_type_ids"], layout, 0)
    positions, cache_positions = compat.POSITION_KWARGS
    if kw.get(positions) is not None:
        kw[positions] = widen_positions(kw[positions], layout)
    if kw.get(cache_positions) is not None:
        kw[cache_positions] = torch.arange(layout.width, device=embeds.device)
    return layout


def extent_of(layout: Layout) -> tuple[int, torch.Tensor] | None:
    """(padded width, each row's own width) of a layout that pads rows past their own length, else None."""
    if not layout.padded:
        return None
    length = int(layout.real.shape[1])
    return layout.width, torch.tensor([length + extra for extra in layout.extra], dtype=torch.long)


def widened_mask(serve: Serving, mask: torch.Tensor) -> torch.Tensor:
    """A 2-D mask of a call whose prompt is already in place (cache or encoder outputs), widened to match."""
    return widen(mask, serve.plan(mask, mask.shape[0], mask.shape[1], mask.device), 1)


def continue_cached(serve: Serving, kw: dict, past_len: int, takes_positions: bool) -> None:
    """A call whose cache already holds the prompt: widen the mask, shift positions by the inserted count."""
    if not serve.single:
        continue_rows(serve, kw, past_len, takes_positions)
        return
    slot = serve.leader
    source = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    mask = kw.get("attention_mask")
    if source is not None and mask is not None and mask.dim() == 2 and \
            mask.shape[-1] + slot.extra == past_len + source.shape[1]:
        kw["attention_mask"] = widened_mask(serve, mask)
    for key in compat.POSITION_KWARGS:
        if kw.get(key) is not None:
            kw[key] = kw[key] + slot.extra


def continue_rows(serve: Serving, kw: dict, past_len: int, takes_positions: bool) -> None:
    """A cached call of rows with prompts of different lengths: the cache holds the first call's widened rows
    (each padded at its right end to the longest), then what was generated. The mask's first-call part is widened
    as the first call widened it; each row's position ids count on from its own prompt's end; the cache positions
    from the widest row's."""
    source = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    mask, first = kw.get("attention_mask"), serve.leader._first_length
    new = 0 if source is None else int(source.shape[1])
    if mask is None or mask.dim() != 2 or first is None or mask.shape[-1] < first:
        raise AttachError("prompt: a cached call whose rows carry prompts of different lengths needs the 2-D "
                          "attention_mask of the whole sequence, after an uncached first call (as generate() makes)")
    head = mask[:, :first]
    mask = torch.cat([widened_mask(serve, head), mask[:, first:]], dim=-1)
    if mask.shape[-1] != past_len + new:
        raise AttachError(f"prompt: the widened attention_mask has {mask.shape[-1]} positions, the cache and the "
                          f"input {past_len + new}; a cached mixed-prompt call must continue the last uncached one")
    kw["attention_mask"] = mask
    positions, cache_positions = compat.POSITION_KWARGS
    shifts = serve.shifts(mask.device)
    if kw.get(positions) is not None:
        kw[positions] = kw[positions] + shifts
    elif takes_positions:  # what the model would derive from the cache length, per row
        start = past_len - serve.most
        kw[positions] = torch.arange(start, start + new, device=mask.device)[None] + shifts
    if kw.get(cache_positions) is not None:
        kw[cache_positions] = kw[cache_positions] + serve.most


__all__ = ["batch_of", "check_mask", "continue_cached", "continue_rows", "extent_of", "serving_of",
           "widen_inputs", "widened_mask"]
