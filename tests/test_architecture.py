"""The house reads as layers: nothing low imports something high, no two modules import each other (directly or
round a longer loop), and no source file grows past ~400 lines.

Every import counts, wherever it sits: module level, inside a function, and under `if TYPE_CHECKING:` (a reader
follows an annotation-only import the same way). The graph has one node per source file (`forms.prompt.hooks`),
so a circle inside a package is seen as well as one between top-level modules; the Hydra plugins
(`hydra_plugins/`) sit above the app they launch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unipelt"
PLUGINS = ROOT / "hydra_plugins"
MAX_LINES = 420

# Low to high, by top-level module of unipelt (or "hydra_plugins"). A module may import only from its own layer or
# below.
LAYERS = [
    {"errors", "compat", "full_tensor", "package_files", "model_snapshot", "row_extent"},
    {"spec_values", "sites", "quantize", "composition", "row_values", "route"},
    {"module_spec"},
    {"compose", "weight_fold", "adapter_merging", "slot", "forms"},
    {"spec"},
    {"placement", "adapter_set", "trained_params"},
    {"attach"},
    {"merge", "io", "accounting", "optim", "peft_names", "peft_interop", "adapters"},
    {"budget", "adapter_folders", "adapter_combine"},
    {"api", "__init__"},
    {"tasks"},
    {"train"},
    {"integrations"},  # the Hugging Face Trainer / TRL integration: above the loop whose checkpoint helpers it uses
    {"app", "cli"},
    {"hydra_plugins"},
]


def _layer(top: str) -> int:
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"unipelt.{top} is in no layer of tests/test_architecture.py; place it")


def _dotted(path: Path) -> str:
    """'forms.prompt.hooks' for unipelt/forms/prompt/hooks.py, 'forms' for its package's __init__, '__init__' for
    the package itself; 'hydra_plugins.x.y' for the plugins."""
    if path.is_relative_to(PLUGINS):
        parts = ("hydra_plugins",) + path.relative_to(PLUGINS).with_suffix("").parts
    else:
        parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _top(node: str) -> str:
    return node.split(".")[0]


def _exists(parts: list[str]) -> str | None:
    """The graph node for unipelt-relative (or hydra_plugins) parts, if such a module or package exists."""
    if not parts:
        return "__init__"
    base = PLUGINS.parent if parts[0] == "hydra_plugins" else PACKAGE
    path = base.joinpath(*parts)
    if path.is_dir() or path.with_suffix(".py").is_file():
        return ".".join(parts)
    return None


def _resolve(parts: list[str], names: list[str]) -> list[str]:
    """`from <parts> import <names>`: each name that is a sub-module is a node of its own; otherwise the module
    `parts` itself (its longest existing prefix: a name re-exported by a package is read from its __init__)."""
    found = []
    for name in names:
        sub = _exists(parts + [name])
        if sub is not None:
            found.append(sub)
            continue
        prefix = list(parts)
        while prefix and _exists(prefix) is None:
            prefix.pop()
        found.append(_exists(prefix) or "__init__")
    return found


def _imports(tree: ast.AST, package_parts: tuple[str, ...]) -> list[str]:
    """Nodes imported anywhere in a file (relative or absolute; module level, in a function or under
    TYPE_CHECKING). `package_parts`: the file's package, unipelt-relative ('forms', 'prompt'), () for unipelt."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                found += _resolve(base + (node.module.split(".") if node.module else []), names)
            elif node.module:
                parts = node.module.split(".")
                if parts[0] == "unipelt":
                    found += _resolve(parts[1:], names)
                elif parts[0] == "hydra_plugins":
                    found += _resolve(parts, names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "unipelt":
                    found += _resolve(parts[1:-1], parts[-1:]) if len(parts) > 1 else ["__init__"]
                elif parts[0] == "hydra_plugins" and len(parts) > 1:
                    found += _resolve(parts[:-1], parts[-1:])
    return found


def _package_parts(path: Path) -> tuple[str, ...]:
    node = _dotted(path)
    parts = tuple(node.split(".")) if node != "__init__" else ()
    return parts if path.name == "__init__.py" else parts[:-1]


def _file_imports(path: Path) -> list[str]:
    return [n for n in _imports(ast.parse(path.read_text()), _package_parts(path)) if n != _dotted(path)]


SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted(PLUGINS.rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        graph.setdefault(_dotted(path), set()).update(_file_imports(path))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (as a closed path), or None. A package and its own sub-modules are not a
    circle through the package: a sub-module importing a sibling by `from . import x` reaches x, not __init__."""
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return trail[trail.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, trail + [node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return None


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_imports_go_down_the_layers(path: Path) -> None:
    own = _top(_dotted(path))
    for imported in _file_imports(path):
        if _top(imported) == own:
            continue
        assert _layer(_top(imported)) <= _layer(own), (
            f"{path.relative_to(ROOT)} (layer {_layer(own)}) imports unipelt.{imported} "
            f"(layer {_layer(_top(imported))})")


def test_the_architecture_test_sees_every_import():
    # A lazy import inside a function and an annotation-only import are both seen; a sub-module imported by name
    # is a node of its own.
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .spec import MethodSpec\n"
              "def f():\n    from .budget import solve_budget\nfrom .forms import base\n"
              "from .forms.base import Form\nimport unipelt.app.report\n")
    assert sorted(_imports(ast.parse(source), ())) == ["app.report", "budget", "forms.base", "forms.base", "spec"]


def test_the_cycle_finder_finds_circles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_modules():
    found = _cycle(_graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_no_import_circle_between_top_level_modules():
    graph: dict[str, set[str]] = {}
    for node, targets in _graph().items():
        graph.setdefault(_top(node), set()).update(_top(t) for t in targets if _top(t) != _top(node))
    found = _cycle(graph)
    assert found is None, "import circle: " + " -> ".join(found)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_files_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it"
