"""Value checks shared by the method grammar: each returns the validated value or raises MethodConfigError with
one line naming the key (`where`) and, where it helps, the allowed values."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import yaml

from .errors import MethodConfigError, allowed


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last
    value in silence: `dim: 8` then `dim: 64` would train with 64)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing a repeated key (raises yaml.YAMLError naming the key and its line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def scale_value(raw: Mapping[str, Any], compose: str, where: str) -> float | str:
    if "scale" not in raw:
        return 1.0
    if compose != "scale":
        raise MethodConfigError(f"{where}: key 'scale' needs compose 'scale' (got compose '{compose}')")
    value = raw["scale"]
    if value == "learned":
        return "learned"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MethodConfigError(f"{where}: scale must be a finite number or 'learned', got {value!r}")
    return float(value)


def layers_value(value: Any, where: str) -> str | tuple[int, ...]:
    if value == "all":
        return "all"
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise MethodConfigError(f"{where}: layers must be 'all' or a non-empty list of layer indices, got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise MethodConfigError(f"{where}: layers must hold integers, got {item!r}")
    return tuple(no_repeats(value, f"{where}: layers"))


def no_repeats(values: Any, where: str) -> Any:
    """A list given twice the same item would place two modules under one name (the second replaces the first,
    whose hooks would keep running): refuse it."""
    seen = set()
    for item in values:
        if item in seen:
            raise MethodConfigError(f"{where}: {item!r} is listed twice")
        seen.add(item)
    return values


def budget_value(value: Any, where: str) -> str | int | None:
    """None, a positive added-parameter count, or a percentage string like '0.5%' in (0, 100]."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    if isinstance(value, str) and value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            percent = -1.0
        if 0.0 < percent <= 100.0:
            return value
    raise MethodConfigError(
        f"{where}: expected a percentage of the base model like '0.5%' or a positive parameter count, got {value!r}"
    )


def names_value(value: Any, where: str) -> tuple[str, ...]:
    """A list of module names (a single name is accepted as a list of one)."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip(".") for v in value):
        raise MethodConfigError(f"{where}: expected a list of module names, got {value!r}")
    return tuple(value)


def choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    """A check (value, where) -> value for one of `options`."""
    return lambda value, where: choice_value(value, options, where)


def expect(kind: type) -> Callable[[Any, str], Any]:
    """A check (value, where) -> value for a value of type `kind` (bool is not an int here)."""
    return lambda value, where: expect_value(value, kind, where)


def choice_value(value: Any, options: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise MethodConfigError(f"{where}: unknown value {value!r} (allowed: {allowed(options)})")
    return value


def expect_value(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise MethodConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def positive_int_value(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MethodConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def positive_float_value(value: Any, where: str) -> float:
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise MethodConfigError(f"{where}: expected a positive finite number, got {value!r}")
    return float(value)


def probability_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise MethodConfigError(f"{where}: expected a number in [0, 1), got {value!r}")
    return float(value)
