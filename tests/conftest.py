"""Test-wide settings. Tiny models run fastest on one thread, and a 2-core CI machine gains nothing from
oversubscribing it; tests that time real training set their own thread count."""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import tiny_models & co. as plain modules
