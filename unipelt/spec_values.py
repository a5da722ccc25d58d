"""Value checks shared by the method grammar: each returns the validated value or raises MethodConfigError with
one line naming the key (`where`) and, where it helps, the allowed values."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import MethodConfigError, allowed


def svd_options(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["init_r"] = positive_int_value(raw.get("init_r", 12), f"{where}: init_r")
    out["target_r"] = positive_int_value(raw.get("target_r", 8), f"{where}: target_r")
    if out["target_r"] > out["init_r"]:
        raise MethodConfigError(f"{where}: target_r {out['target_r']} exceeds init_r {out['init_r']}")
    for key, default in (("tinit", 0.1), ("tfinal", 0.5)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                isinstance(value, float) and value >= 1):
            raise MethodConfigError(f"{where}: {key} must be a step count (int >= 0) or a fraction of the run "
                                    f"(float in [0, 1)), got {value!r}")
        out[key] = value
    if all(isinstance(out[k], float) for k in ("tinit", "tfinal")) and out["tinit"] + out["tfinal"] >= 1:
        raise MethodConfigError(f"{where}: tinit + tfinal must leave steps for the schedule (got "
                                f"{out['tinit']} + {out['tfinal']} >= 1)")
    out["delta_t"] = positive_int_value(raw.get("delta_t", 100), f"{where}: delta_t")
    for key in ("beta1", "beta2"):
        out[key] = probability_value(raw.get(key, 0.85), f"{where}: {key}")
    weight = raw.get("orth_reg_weight", 0.1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise MethodConfigError(f"{where}: orth_reg_weight must be a number >= 0, got {weight!r}")
    out["orth_reg_weight"] = float(weight)
    alpha = raw.get("alpha")
    out["alpha"] = None if alpha is None else positive_float_value(alpha, f"{where}: alpha")
    pattern = raw.get("rank_pattern")
    if pattern is not None:
        if not isinstance(pattern, Mapping):
            raise MethodConfigError(f"{where}: rank_pattern must map 'stack.layer.site' to a rank, got {pattern!r}")
        for key, rank in pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= out["init_r"]:
                raise MethodConfigError(f"{where}: rank_pattern['{key}'] must be an integer in 0..init_r "
                                        f"({out['init_r']}), got {rank!r}")
        pattern = tuple(sorted((str(k), int(v)) for k, v in pattern.items()))
    out["rank_pattern"] = pattern
    return out


def scale_value(raw: Mapping[str, Any], compose: str, where: str) -> float | str:
    if "scale" not in raw:
        return 1.0
    if compose != "scale":
        raise MethodConfigError(f"{where}: key 'scale' needs compose 'scale' (got compose '{compose}')")
    value = raw["scale"]
    if value == "learned":
        return "learned"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodConfigError(f"{where}: scale must be a number or 'learned', got {value!r}")
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
    return tuple(value)


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MethodConfigError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def probability_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise MethodConfigError(f"{where}: expected a number in [0, 1), got {value!r}")
    return float(value)
