"""The one rule by which the suite compares floats (docs/testing.md, "Comparing floats").

1. The same operations on the same values (the same function, weights, inputs, dtype and shapes, in one process):
   torch on CPU is deterministic for a given thread count and kernel set, so the two sides are equal bit for bit
   on any CPU and at any thread count. `assert_same`.
2. Anything else (another formula for the same mathematics, another kernel, a re-associated or fused expression,
   a matmul over another batch shape, another order of a sum): the two sides differ by rounding only, and the
   tolerance counts units of the dtype's precision at the reference's magnitude:

       |actual - expected| <= ULPS_PER_OP * ops * eps(dtype) * scale      for every element

   `ops`: how many operations that the compared values depend on round differently on the two sides (each merged
   slot's sum and product, each projection another library computes, each attention another kernel runs, each
   training step's re-ordered sums); the call's `reason` names them. `scale`: max|expected|, unless the test
   names the magnitude of the terms those operations add up (a result near zero, a difference of large terms).
   `dtype`: the coarser of the two sides' dtypes, unless the differing operations ran in a coarser one
   (autocast). `assert_close_scaled`.

`assert_differs` is the converse: a change the test relies on must be larger than rounding could explain.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# Units of eps(dtype) at the reference's magnitude that one differently rounded operation may cost, with what the
# layers after it (the same on both sides) make of it. Each side rounds an element of the operation's result once
# (0.5 ulp); a reduction of the tiny models' widths (up to a few hundred terms) in another order differs by a few
# ulps of its terms at worst. Measured over every scaled comparison of the suite at 1 and 2 threads, with
# ATEN_CPU_CAPABILITY=default and with MKL_CBWR=COMPATIBLE: at most 1.16 ulps per counted operation
# (docs/testing.md), so 4 leaves a margin above 3, while a 1e-3 relative change of the adapters still fails the
# whole-model comparisons.
ULPS_PER_OP = 4


# Parameters after optimizer steps, compared at the size of a step instead (docs/testing.md): Adam divides each
# gradient element by its own running RMS, so an element whose exact gradient is zero or cancels (an attention key
# bias, which softmax ignores) moves by normalised rounding noise, not by rounding of its own size; what bounds the
# two runs' difference there is the step, lr. Measured at most 5.2e-4 of a step (FSDP against one process, every
# preset and family); the bound holds while such noise gradients stay below Adam's epsilon, as in the tiny models.
STEP_FRACTION = 1e-3


def threads_from_env() -> int:
    """The thread count the suite runs torch with: UNIPELT_TEST_THREADS, 1 when unset (tests/conftest.py)."""
    raw = os.environ.get("UNIPELT_TEST_THREADS", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"UNIPELT_TEST_THREADS must be a whole number >= 1, got {raw!r}")
    return int(raw)


def _log(kind: str, worst: float, unit: float, ops: int | None, dtype: torch.dtype) -> None:
    """With UNIPELT_NUMERICS_LOG=<file>, one JSON line per comparison: where, how many ulps of the scale it differed
    by, and what was allowed (how docs/testing.md's measured margins are re-measured on another machine)."""
    path = os.environ.get("UNIPELT_NUMERICS_LOG")
    if not path:
        return
    caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if f.filename != __file__), None)
    site = f"{os.path.basename(caller.filename)}:{caller.lineno}" if caller else "?"
    ulps = worst / unit if unit else (0.0 if worst == 0 else math.inf)
    with open(path, "a") as out:
        out.write(json.dumps({"site": site, "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
                              "kind": kind, "ulps": ulps, "allowed": None if ops is None else ULPS_PER_OP * ops,
                              "dtype": str(dtype).removeprefix("torch.")}) + "\n")


def _as_tensor(value: Any, dtype: torch.dtype | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if dtype is None:
        raise TypeError("comparing plain numbers: pass dtype= (the dtype they were computed in)")
    return torch.tensor(value, dtype=torch.float64)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists of numbers or tensors (records read back from JSON), by path."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key in value:
            out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    if _is_collection(value):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _scale(expected: torch.Tensor, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    return float(expected.abs().max()) if expected.numel() else 0.0


def tolerance(expected: Any, *, ops: int, dtype: torch.dtype | None = None, scale: float | None = None) -> float:
    """The largest |difference| rule 2 allows against `expected`: ULPS_PER_OP · ops · eps(dtype) · scale."""
    if not isinstance(ops, int) or ops < 1:
        raise ValueError(f"ops must be a whole number >= 1 (the differently rounded operations), got {ops!r}")
    reference = _as_tensor(expected, dtype)
    return ULPS_PER_OP * ops * torch.finfo(dtype or reference.dtype).eps * _scale(reference, scale)


def assert_same(actual: Any, expected: Any, msg: str = "") -> None:
    """Rule 1: bit for bit (dtype, shape and every value; a NaN matches a NaN at the same place)."""
    where = f"{msg}: " if msg else ""
    if not (isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor)):
        assert actual == expected or (actual != actual and expected != expected), f"{where}{actual!r} != {expected!r}"
        return
    assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor), f"{where}a tensor and a number"
    assert actual.dtype == expected.dtype, f"{where}dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{where}shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a, e = actual.detach(), expected.detach()
    both_nan = a.isnan() & e.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    differ = (a != e) & ~both_nan
    if not differ.any():
        _log("same", 0.0, 1.0, None, a.dtype)
        return
    if a.is_floating_point():
        diff = torch.where(differ, (a.double() - e.double()).abs().nan_to_num(math.inf), 0.0)
        _log("same", float(diff.max()), torch.finfo(a.dtype).eps * _scale(e.double().nan_to_num(), None), None,
             a.dtype)
    else:
        diff = differ.double()
    index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    raise AssertionError(f"{where}not bit-identical: {int(differ.sum())} of {a.numel()} elements differ, "
                         f"largest |diff| {float(diff.max()):.3g} at {index}")


def _is_collection(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and \
        not all(isinstance(v, (int, float)) for v in value)


def assert_close_scaled(actual: Any, expected: Any, *, ops: int, reason: str, dtype: torch.dtype | None = None,
                        scale: float | None = None, msg: str = "") -> None:
    """Rule 2: equal up to `ops` differently rounded operations (see the module docstring).

    `reason` names those operations: it is the justification of `ops` and is printed on failure. Tensors, plain
    numbers or lists of numbers, or dicts / lists of those (compared entry by entry, each at its own magnitude);
    plain numbers need `dtype`, the dtype they were computed in.
    """
    if not reason.strip():
        raise ValueError("reason: name the operations whose rounding differs")
    if _is_collection(actual):
        flat_a, flat_e = _flatten(actual), _flatten(expected)
        assert flat_a.keys() == flat_e.keys(), f"{msg}: entries {sorted(flat_a)} != {sorted(flat_e)}"
        for key in flat_a:
            assert_close_scaled(flat_a[key], flat_e[key], ops=ops, reason=reason, dtype=dtype, scale=scale,
                                msg=f"{msg} [{key}]" if msg else f"[{key}]")
        return
    a, e = _as_tensor(actual, dtype), _as_tensor(expected, dtype)
    where = f"{msg}: " if msg else ""
    assert a.shape == e.shape, f"{where}shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    assert a.is_floating_point() and e.is_floating_point(), f"{where}not floats: {a.dtype}, {e.dtype}"
    dtype = dtype or _coarser(a.dtype, e.dtype)
    allowed = tolerance(e, ops=ops, dtype=dtype, scale=scale)
    if a.numel() == 0:
        return
    assert torch.isfinite(a).all() and torch.isfinite(e).all(), f"{where}non-finite values"
    diff = (a.double() - e.double()).abs()
    worst = float(diff.max())
    unit = torch.finfo(dtype).eps * _scale(e, scale)
    _log("scaled", worst, unit, ops, dtype)
    if worst <= allowed:
        return
    index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    raise AssertionError(
        f"{where}|diff| {worst:.3g} at {index} is {worst / unit if unit else math.inf:.1f} ulps of the scale "
        f"{_scale(e, scale):.3g} in {dtype}; {ULPS_PER_OP}·{ops} = {ULPS_PER_OP * ops} allowed "
        f"({int((diff > allowed).sum())} of {a.numel()} elements over). Differing operations: {reason}")


def assert_differs(actual: Any, expected: Any, *, ops: int, reason: str, dtype: torch.dtype | None = None,
                   scale: float | None = None, msg: str = "") -> None:
    """A change the test relies on is more than rounding: larger than rule 2's tolerance for `ops` operations."""
    if not reason.strip():
        raise ValueError("reason: say what makes the two sides differ")
    a, e = _as_tensor(actual, dtype), _as_tensor(expected, dtype)
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    allowed = tolerance(e, ops=ops, dtype=dtype or _coarser(a.dtype, e.dtype), scale=scale)
    worst = float((a.double() - e.double()).abs().max()) if a.numel() else 0.0
    _log("differs", worst, allowed / (ULPS_PER_OP * ops) if allowed else 0.0, ops, dtype or a.dtype)
    assert worst > allowed, (f"{msg + ': ' if msg else ''}the two sides differ by at most {worst:.3g}, within "
                             f"rounding ({allowed:.3g}); expected a difference: {reason}")


def assert_close_trained(actual: torch.Tensor, expected: torch.Tensor, *, lr: float, reason: str,
                         msg: str = "") -> None:
    """Parameters trained by the same optimizer steps on two sides whose gradients round differently (another batch
    split, another reduction across processes): |actual − expected| ≤ STEP_FRACTION · lr for every element."""
    if not reason.strip():
        raise ValueError("reason: say what rounds differently in the steps")
    where = f"{msg}: " if msg else ""
    assert actual.shape == expected.shape, f"{where}shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    diff = (actual.detach().double() - expected.detach().double()).abs()
    worst, allowed = float(diff.max()), STEP_FRACTION * lr
    _log("trained", worst, lr, None, expected.dtype)
    assert worst <= allowed, (f"{where}|diff| {worst:.3g} is {worst / lr:.2g} of an optimizer step (lr {lr:g}); "
                              f"{STEP_FRACTION:g} allowed. Rounding that differs in the steps: {reason}")
