"""The house reads as layers: nothing low imports something high (function-level imports included), the
top-level modules import each other without a cycle, and no source file grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unipelt"
MAX_LINES = 420

# Low to high. A module may import only from its own layer or below, wherever the import statement sits (module
# level or inside a function); imports under `if TYPE_CHECKING:` are annotations only and are not counted.
LAYERS = [
    {"errors", "compat", "full_tensor"},
    {"spec_values", "sites", "quantize"},
    {"compose", "weight_fold", "slot", "forms", "rank_allocator"},
    {"spec"},
    {"placement"},
    {"attach"},
    {"merge", "io", "accounting", "optim", "peft_names", "peft_interop"},
    {"budget"},
    {"api", "__init__"},
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


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return skipped


def _module_level_imports(path: Path) -> list[str]:
    """Top-level unipelt sub-packages imported anywhere in the file (relative or absolute, module level or inside
    a function), except under `if TYPE_CHECKING:`."""
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    return _imports(ast.parse(path.read_text()), package_parts)


def _imports(tree: ast.AST, package_parts: tuple[str, ...]) -> list[str]:
    skipped = _type_checking_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def test_the_architecture_test_sees_function_level_imports():
    # A lazy upward import (the kind that once hid attach -> budget -> accounting -> attach) is seen; an
    # annotation-only import is not.
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .spec import MethodSpec\n" \
             "def f():\n    from .budget import solve_budget\n"
    assert _imports(ast.parse(source), ("unipelt",)) == ["budget"]


def test_no_import_cycle_between_top_level_modules():
    graph: dict[str, set[str]] = {}
    for path in SOURCES + [PACKAGE / "__init__.py"]:
        own = _top(path)
        graph.setdefault(own, set()).update(m for m in _module_level_imports(path) if m != own)

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])

    for start in sorted(graph):
        visit(start, [])


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_files_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it"
