"""PEFT's naming rules, reimplemented for reading and writing its files: which module names a `target_modules` /
`exclude_modules` entry selects, which `rank_pattern` / `alpha_pattern` key applies to a name, which layer index
`layers_to_transform` sees, and the map from a model's projection modules to unipelt sites."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from . import compat
from .sites.resolve import base_prefix, family_of
from .sites.table import Projection


def target_suffixes(targets: set[str], all_names: list[str]) -> list[str]:
    """The shortest name suffixes that PEFT's list matching maps to exactly `targets` (e.g. ['query', 'value'])."""
    chosen = set()
    for name in sorted(targets):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            if k < len(parts) and parts[-k].isdigit():
                continue  # 'layer.1.output.dense' reads better than '1.output.dense'
            suffix = ".".join(parts[-k:])
            if all(n in targets for n in all_names if n == suffix or n.endswith("." + suffix)):
                chosen.add(suffix)
                break
    return sorted(chosen)


def projection_index(model: nn.Module) -> dict[str, list[tuple[str, int, str, tuple[int, int] | None]]]:
    """Every projection module of the model -> its unipelt sites as (stack, layer, site, chunk)."""
    family = family_of(model.config)
    modules = dict(model.named_modules())
    root = base_prefix(model)
    index: dict[str, list] = {}
    for stack_name, stack in family.stacks.items():
        layers = modules.get(".".join(p for p in (root, stack.path) if p))
        for layer in range(len(layers) if layers is not None else 0):
            prefix = ".".join(p for p in (root, stack.path, str(layer)) if p)
            for site, entry in stack.sites.items():
                if not isinstance(entry, Projection):
                    continue
                name = next((f"{prefix}.{path}" for path in entry.path.split("|") if f"{prefix}.{path}" in modules),
                            None)
                if name is not None:
                    index.setdefault(name, []).append((stack_name, layer, site, entry.chunk))
    return index


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's rule: the first key that matches the end of the name
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def name_matches(patterns: str | list[str], name: str) -> bool:
    """PEFT's rule for target_modules / exclude_modules: a regex must match the whole name; a list entry must
    equal the name or be its last dotted parts."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return name in patterns or any(name.endswith(f".{p}") for p in patterns)


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """PEFT's rule for layers_to_transform: the first numbered segment (after `layers_pattern`, when given)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    if compat.is_transposed_linear(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


__all__ = ["linear_in_out", "layer_index", "name_matches", "pattern_value", "projection_index", "target_suffixes"]
