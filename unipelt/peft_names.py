"""PEFT's naming rules, reimplemented for reading and writing its files: which module names a `target_modules` /
`exclude_modules` entry selects, which `rank_pattern` / `alpha_pattern` key applies to a name, which layer index
`layers_to_transform` sees."""

from __future__ import annotations

import re
from typing import Any



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


__all__ = ["layer_index", "name_matches", "pattern_value", "target_suffixes"]
