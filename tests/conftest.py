"""Test-wide settings. Tiny models run fastest on one thread, and a 2-core CI machine gains nothing from
oversubscribing it, so torch runs on one thread unless UNIPELT_TEST_THREADS names another count: the suite's float
comparisons hold on any CPU and thread count (docs/testing.md), and this is how to check the second. Tests that
time real training set their own thread count."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import tiny_models & co. as plain modules

from numerics import threads_from_env  # noqa: E402

torch.set_num_threads(threads_from_env())
