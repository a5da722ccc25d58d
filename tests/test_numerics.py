"""The float-comparison rule itself (tests/numerics.py): exact means bit for bit, the scaled tolerance is exactly
ULPS_PER_OP · ops · eps(dtype) · scale, and each helper fails where it should."""

from __future__ import annotations

import math

import pytest
import torch

from numerics import (STEP_FRACTION, ULPS_PER_OP, assert_close_scaled, assert_close_trained, assert_differs,
                      assert_same, threads_from_env, tolerance)


def test_same_is_bit_for_bit():
    x = torch.tensor([1.0, -2.5, float("nan")])
    assert_same(x, x.clone())  # a NaN matches a NaN at the same place
    with pytest.raises(AssertionError, match="not bit-identical: 1 of 3"):
        assert_same(x, torch.tensor([1.0, torch.nextafter(torch.tensor(-2.5), torch.tensor(0.0)).item(), float("nan")]))
    with pytest.raises(AssertionError, match="dtype"):
        assert_same(x, x.double())
    with pytest.raises(AssertionError, match="shape"):
        assert_same(x, x[:2])
    with pytest.raises(AssertionError, match="1 of 1"):
        assert_same(torch.tensor([float("inf")]), torch.tensor([torch.finfo(torch.float32).max]))
    assert_same(0.25, 0.25)
    with pytest.raises(AssertionError):
        assert_same(0.25, math.nextafter(0.25, 1.0))


def test_the_tolerance_is_the_documented_product():
    expected = torch.tensor([0.5, -3.0, 2.0])
    eps = torch.finfo(torch.float32).eps
    assert tolerance(expected, ops=3) == ULPS_PER_OP * 3 * eps * 3.0
    assert tolerance(expected, ops=1, scale=10.0) == ULPS_PER_OP * eps * 10.0
    assert tolerance(expected, ops=1, dtype=torch.bfloat16) == ULPS_PER_OP * torch.finfo(torch.bfloat16).eps * 3.0
    with pytest.raises(ValueError, match="ops"):
        tolerance(expected, ops=0)
    with pytest.raises(TypeError, match="dtype"):
        tolerance(1.0, ops=1)


def test_scaled_passes_at_the_bound_and_fails_just_past_it():
    expected = torch.tensor([1.0, -4.0, 0.001])
    allowed = tolerance(expected, ops=2)
    # the scale is the largest magnitude: the small element gets the same absolute tolerance (rounding in a sum
    # is relative to its terms, not to its result)
    assert_close_scaled(expected + torch.tensor([0.0, 0.0, allowed * 0.9]), expected, ops=2, reason="test")
    with pytest.raises(AssertionError, match="Differing operations: test"):
        assert_close_scaled(expected + torch.tensor([0.0, allowed * 1.5, 0.0]), expected, ops=2, reason="test")
    with pytest.raises(ValueError, match="reason"):
        assert_close_scaled(expected, expected, ops=1, reason=" ")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_scaled(torch.tensor([float("nan")]), torch.tensor([1.0]), ops=1, reason="test")


def test_the_coarser_dtype_sets_eps():
    reference = torch.tensor([3.0])
    half_ulp = torch.tensor([3.0 + 0.5 * torch.finfo(torch.bfloat16).eps * 3.0])
    assert_close_scaled(half_ulp.bfloat16().float(), reference, ops=1, dtype=torch.bfloat16, reason="test")
    with pytest.raises(AssertionError):
        assert_close_scaled(torch.tensor([3.0 + 0.02 * 3.0]), reference, ops=1, reason="test")  # float32's eps


def test_numbers_and_records_need_their_dtype_and_compare_entry_by_entry():
    ours = {"loss": 0.6931472, "metrics": {"accuracy": 0.75, "loss": 0.52}}
    theirs = {"loss": 0.6931471, "metrics": {"accuracy": 0.75, "loss": 0.52}}
    assert_close_scaled(ours, theirs, ops=1, dtype=torch.float32, reason="test")
    with pytest.raises(AssertionError, match=r"\[metrics.loss\]"):
        assert_close_scaled(ours, {**theirs, "metrics": {"accuracy": 0.75, "loss": 0.5201}}, ops=1,
                            dtype=torch.float32, reason="test")
    with pytest.raises(TypeError, match="dtype"):
        assert_close_scaled(0.5, 0.5, ops=1, reason="test")
    assert_close_scaled([1.0, 2.0], [1.0, 2.0 + 1e-7], ops=1, dtype=torch.float32, reason="test")


def test_differs_needs_more_than_rounding():
    expected = torch.tensor([1.0, 2.0])
    assert_differs(expected + 1e-3, expected, ops=1, reason="test")
    with pytest.raises(AssertionError, match="within rounding"):
        assert_differs(expected + tolerance(expected, ops=1) / 2, expected, ops=1, reason="test")


def test_trained_parameters_compare_at_a_fraction_of_the_step():
    expected = torch.tensor([1e-8, 0.5])
    assert_close_trained(expected + STEP_FRACTION * 1e-2 * 0.9, expected, lr=1e-2, reason="test")
    with pytest.raises(AssertionError, match="of an optimizer step"):
        assert_close_trained(expected + STEP_FRACTION * 1e-2 * 1.1, expected, lr=1e-2, reason="test")
    assert_close_trained(torch.zeros(0), torch.zeros(0), lr=1e-2, reason="test")  # a tensor pruned away


def test_thread_count_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("UNIPELT_TEST_THREADS", raising=False)
    assert threads_from_env() == 1
    monkeypatch.setenv("UNIPELT_TEST_THREADS", "2")
    assert threads_from_env() == 2
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv("UNIPELT_TEST_THREADS", bad)
        with pytest.raises(ValueError, match="UNIPELT_TEST_THREADS"):
            threads_from_env()
