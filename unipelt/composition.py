"""Composition blocks of named adapters: how several adapters that sit at one site act on h together.

In the language of the axes, a block is a composition function one level up, between adapters:

- `Stack(a, b, ...)`: sequential. Each adapter reads h as the one before it left it (b sees a's output). A plain
  list of names means the same (every adapter applied, in list order).
- `Parallel(a, b, ...)`: every adapter reads the same h; their Δh are summed into it.
- `Average(a, b, ..., weights=None)`: the same, each Δh weighted (equal weights, summing to one, by default).
- `BatchSplit(a, b, ..., sizes=[...])`: the batch's rows in order, sizes[i] rows to the i-th member.

Members: a Stack holds names, Parallel / Average blocks and BatchSplits; a Parallel or an Average holds names; a
BatchSplit holds names and Stacks. (Deeper nestings have no meaning a forward hook can compute in one pass.)

Blocks are immutable values; `block_from_config` reads them from YAML-shaped data ({"stack": ["a", {"parallel":
["b", "c"]}]}); `block_to_config` writes that shape back. Nothing here knows a model: unipelt.adapters validates
the names against one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from .errors import AttachError


def _members(kind: str, items: tuple) -> tuple:
    if not items:
        raise AttachError(f"{kind}: needs at least one adapter")
    if len(items) == 1 and isinstance(items[0], (list, tuple)):
        items = tuple(items[0])
    return tuple(items)


@dataclass(frozen=True, init=False)
class Stack:
    members: tuple

    def __init__(self, *members: Any) -> None:
        object.__setattr__(self, "members", _members("Stack", members))


@dataclass(frozen=True, init=False)
class Parallel:
    members: tuple

    def __init__(self, *members: Any) -> None:
        object.__setattr__(self, "members", _members("Parallel", members))


@dataclass(frozen=True, init=False)
class Average:
    members: tuple
    weights: tuple

    def __init__(self, *members: Any, weights: Any = None) -> None:
        members = _members("Average", members)
        if weights is None:
            weights = tuple(1.0 / len(members) for _ in members)
        weights = tuple(weights)
        if len(weights) != len(members):
            raise AttachError(f"Average: {len(weights)} weights for {len(members)} adapters")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise AttachError(f"Average: weight {w!r} is not a finite number")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))


@dataclass(frozen=True, init=False)
class BatchSplit:
    members: tuple
    sizes: tuple

    def __init__(self, *members: Any, sizes: Any = None) -> None:
        members = _members("BatchSplit", members)
        if sizes is None:
            raise AttachError("BatchSplit: sizes=[...] (rows per adapter, in order) is required")
        sizes = tuple(sizes)
        if len(sizes) != len(members):
            raise AttachError(f"BatchSplit: {len(sizes)} sizes for {len(members)} adapters")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise AttachError(f"BatchSplit: size {s!r} is not a row count (an int >= 0)")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "sizes", sizes)


Block = Union[Stack, Parallel, Average, BatchSplit]
BLOCK_TYPES = (Stack, Parallel, Average, BatchSplit)
ALLOWED = {Stack: (str, Parallel, Average, BatchSplit), Parallel: (str,), Average: (str,), BatchSplit: (str, Stack)}


def as_block(spec: Any) -> Stack:
    """A name, a list of names or a block, as a Stack at the top (the form every other part reads), checked for
    shape (not yet for names)."""
    if isinstance(spec, str):
        block = Stack(spec)
    elif isinstance(spec, (list, tuple)):
        block = Stack(*spec)
    elif isinstance(spec, BLOCK_TYPES):
        block = spec if isinstance(spec, Stack) else Stack(spec)
    else:
        raise AttachError(f"set_active: expected an adapter name, a list of names or a composition block "
                          f"(Stack, Parallel, Average, BatchSplit), got {type(spec).__name__}")
    _check_shape(block)
    return block


def _check_shape(block: Any) -> None:
    allowed = ALLOWED[type(block)]
    for member in block.members:
        if not isinstance(member, allowed):
            what = type(member).__name__
            raise AttachError(f"{type(block).__name__}: cannot hold a {what} "
                              f"(allowed: {', '.join(t.__name__ if t is not str else 'names' for t in allowed)})")
        if isinstance(member, str) and not member:
            raise AttachError(f"{type(block).__name__}: an empty adapter name")
        if isinstance(member, BLOCK_TYPES):
            _check_shape(member)


def names_in(block: Any) -> list[str]:
    """Every adapter name in a block, in order of appearance (repeats kept)."""
    if isinstance(block, str):
        return [block]
    return [name for member in block.members for name in names_in(member)]


def simplest(block: Stack) -> Any:
    """What active_adapters reports: a name for one adapter, a list for a plain stack of names, else the block."""
    if all(isinstance(m, str) for m in block.members):
        return block.members[0] if len(block.members) == 1 else list(block.members)
    if len(block.members) == 1:
        return block.members[0]
    return block


def block_from_config(data: Any, caller: str = "composition") -> Any:
    """A name / list / block from YAML-shaped data: {"stack": [...]}, {"parallel": [...]},
    {"average": [...], "weights": [...]}, {"batch_split": [...], "sizes": [...]}."""
    if isinstance(data, str):
        return data
    if isinstance(data, (list, tuple)):
        return [block_from_config(item, caller) for item in data]
    if isinstance(data, BLOCK_TYPES):
        return data
    if not isinstance(data, dict):
        raise AttachError(f"{caller}: expected an adapter name, a list or a composition block (or its mapping), "
                          f"got {type(data).__name__}")
    kinds = {"stack": Stack, "parallel": Parallel, "average": Average, "batch_split": BatchSplit}
    found = [k for k in data if k in kinds]
    if len(found) != 1:
        raise AttachError(f"{caller}: a mapping needs exactly one of {', '.join(kinds)}; got keys {sorted(data)}")
    kind = found[0]
    extra = {"average": {"weights"}, "batch_split": {"sizes"}}.get(kind, set())
    unknown = sorted(set(data) - {kind} - extra)
    if unknown:
        raise AttachError(f"{caller}: unknown key '{unknown[0]}' in a {kind} block")
    members = data[kind]
    if not isinstance(members, (list, tuple)):
        raise AttachError(f"{caller}: {kind} takes a list of adapters, got {type(members).__name__}")
    parsed = [block_from_config(m, caller) for m in members]
    parsed = [Stack(*m) if isinstance(m, list) else m for m in parsed]
    options = {k: data[k] for k in extra if k in data}
    return kinds[kind](*parsed, **options)


def block_to_config(block: Any) -> Any:
    if isinstance(block, str):
        return block
    kind = {Stack: "stack", Parallel: "parallel", Average: "average", BatchSplit: "batch_split"}[type(block)]
    out: dict[str, Any] = {kind: [block_to_config(m) for m in block.members]}
    if isinstance(block, Average):
        out["weights"] = list(block.weights)
    if isinstance(block, BatchSplit):
        out["sizes"] = list(block.sizes)
    return out


__all__ = ["Average", "BatchSplit", "Block", "Parallel", "Stack", "as_block", "block_from_config",
           "block_to_config", "names_in", "simplest"]
