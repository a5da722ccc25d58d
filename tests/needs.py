"""What some tests need from outside the repository: ../shared/data and the dev extras.

Locally a missing piece skips the test with its reason. In CI (`CI` set to true, as .ci/run does) it fails: the
CI machine always has ../shared beside the clone and installs the dev extras, so a skip there would hide a broken
setup behind a green run.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
GLUE = SHARED / "data" / "glue"
SST2 = GLUE / "sst2"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI is set: required there, not skipped)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need_data(*paths: Path) -> None:
    """Skip locally, fail in CI, when a data file or folder is missing."""
    for path in paths:
        if not Path(path).exists():
            _missing(f"{path} not found (the shared data beside the repo)")


def need_module(name: str) -> ModuleType:
    """Import a dev-extra package; skip locally, fail in CI, when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _missing(f"{name} is not installed ({exc})")
        raise  # unreachable: _missing raises
