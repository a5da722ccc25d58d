"""Which prompt serves which row of a call, when several prompt adapters sit on one model (unipelt.adapters).

Every prompt slot of a model is registered in one list on the model (in hook order). With one prompt active on
every row, its own hooks act as they always did (`Serving.single`). Under a Route (a mixed batch, a BatchSplit),
the first routed prompt slot leads the call: its hooks lay out every row with the template of the prompt that
serves it (none for rows of the base or of other forms), pad shorter rows at their right end, and the other
prompt slots' hooks stand aside. So a row sees exactly the positions it has alone with its adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layout import Layout, inserted_count, plan

PEERS = "_unipelt_prompt_slots"  # the model's prompt slots, in the model's __dict__ (copy.deepcopy keeps it)


class Registration:
    """The handle that takes a slot off its model's list (detach and hook re-ordering call remove())."""

    def __init__(self, peers: list, slot: Any) -> None:
        self.peers, self.slot = peers, slot

    def remove(self) -> None:
        self.peers[:] = [peer for peer in self.peers if peer is not self.slot]


def register(model: nn.Module, slot: Any) -> Registration:
    peers = model.__dict__.setdefault(PEERS, [])
    peers.append(slot)
    slot._peers = peers
    return Registration(peers, slot)


class Serving:
    """The prompts of one call: `per_row[i]` is the slot whose virtual tokens row i gets (None: none)."""

    def __init__(self, leader: Any, per_row: list[Any]) -> None:
        self.leader, self.per_row = leader, per_row
        self.single = all(slot is leader for slot in per_row)
        self.extras = [0 if slot is None else slot.extra for slot in per_row]
        self.most = max(self.extras, default=0)

    def plan(self, mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> Layout:
        if self.single:
            return plan(self.leader.template, mask, batch, length, device)
        return plan([None if slot is None else slot.template for slot in self.per_row], mask, batch, length, device)

    def inserted(self, like: torch.Tensor) -> torch.Tensor:
        """[extra, d] (one prompt on every row) or [B, most, d]: each row's virtual and anchor vectors, zeros after
        a shorter prompt's (padding, masked)."""
        if self.single:
            return self.leader.inserted(like)
        order = list(dict.fromkeys(self.per_row))
        table = []
        for slot in order:
            vectors = like.new_zeros((0, like.shape[-1])) if slot is None else slot.inserted(like)
            table.append(nn.functional.pad(vectors, (0, 0, 0, self.most - vectors.shape[0])))
        which = torch.tensor([order.index(slot) for slot in self.per_row], device=like.device)
        return torch.stack(table).index_select(0, which)

    def shifts(self, device: torch.device) -> torch.Tensor:
        """[B, 1]: positions each row's prompt inserted (what a cached call's position ids are shifted by)."""
        return torch.tensor(self.extras, dtype=torch.long, device=device)[:, None]


def serving(slot: Any, batch: int) -> Serving | None:
    """What this slot's hooks do in a call of `batch` rows: a Serving, or None (inactive; another prompt slot leads
    the call; no row gets a prompt)."""
    if not slot.active:
        return None
    if slot.route is None:
        return Serving(slot, [slot] * batch)
    routed = [peer for peer in getattr(slot, "_peers", [slot]) if peer.active and peer.route is not None]
    if not routed or routed[0] is not slot:
        return None
    per_row: list[Any] = [None] * batch
    for peer in routed:
        rows = peer.route.rows_at(batch)
        for index in (range(batch) if rows is None else rows.tolist()):
            per_row[index] = peer
    if all(peer is None for peer in per_row):
        return None
    return Serving(slot, per_row)


__all__ = ["PEERS", "Registration", "Serving", "inserted_count", "register", "serving"]
