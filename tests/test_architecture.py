"""The house reads as layers: nothing low imports something high, and no source file grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unipelt"
MAX_LINES = 420

# Low to high. A module may import (at module level) only from its own layer or below; lazy imports inside a
# function that reach upwards are the documented exceptions (attach → merge / budget) and are not checked here.
LAYERS = [
    {"errors", "compat"},
    {"spec", "spec_values", "prompt_grammar"},
    {"forms", "compose", "sites", "quantize"},
    {"attention", "prompt_layout", "prompting", "rank_allocator"},
    {"attach"},
    {"merge", "io", "accounting", "optim", "budget", "peft_names", "peft_interop", "__init__"},
    {"tasks"},
    {"train"},
    {"app", "cli"},
]


def _layer(top: str) -> int:
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"unipelt.{top} is in no layer of tests/test_architecture.py; place it")


def _top(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _module_or_api(name: str) -> str:
    exists = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()
    return name if exists else "__init__"


def _module_level_imports(path: Path) -> list[str]:
    """Top-level unipelt sub-packages imported at module level (relative or absolute)."""
    tree = ast.parse(path.read_text())
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                if len(target) == 1:  # "from .. import x": a sub-module, or a name of the public API (__init__)
                    found += [_module_or_api(alias.name) for alias in node.names]
                else:
                    found.append(target[1])
            elif node.module and node.module.split(".")[0] == "unipelt":
                parts = node.module.split(".")
                found += [_module_or_api(a.name) for a in node.names] if len(parts) == 1 else [parts[1]]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "unipelt" and len(parts) > 1:
                    found.append(parts[1])
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_imports_go_down_the_layers(path: Path) -> None:
    own = _layer(_top(path))
    for imported in _module_level_imports(path):
        if imported == _top(path):
            continue
        assert _layer(imported) <= own, f"{path.relative_to(PACKAGE)} (layer {own}) imports unipelt.{imported} (layer {_layer(imported)})"


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_files_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it"
