"""Equal-budget comparisons: solve a method's module sizes for a parameter budget.

`method.budget: "0.5%"` (of the base model's parameters, task head excluded) or `budget: 550000` (added
parameters) asks for sizes such that methods are compared at the same number of added parameters, as He et
al.'s figures do. The budget is on `added` in the paper's accounting (`unipelt.count_parameters`: a prefix counts
2·l·d per attention module, its reparameterisation MLP is not counted; base weights a method trains are not part
of it).

What is solved: every module's size key (bottleneck `dim`, prefix / prompt `length`, svd `init_r`, with `target_r`
following in proportion) is the module's size in the spec times one common factor c, rounded down and at least 1,
so the ratios written in the spec are kept (up to rounding). Among the sizes this path reaches, the solver picks the one whose added count is closest
to the budget without exceeding it. Each size is capped where it stops making sense: a bottleneck / rank at the
width of its narrowest site (a wider one is no longer low-rank), a prefix or prompt at MAX_LENGTH vectors.
A budget below the count at size 1 everywhere, or above the count at the caps, is refused with both limits.

Budget shares: when every module sets `budget_share` (MAM: prefix and adapter), each module is sized alone, as He et
al. size MAM's ingredients: the largest size whose own added count fits its share of the budget. A budget run of MAM
then keeps a real prefix (a common factor on l=30 : r=512 would shrink the prefix to l=1 at 0.5%).

Counting happens on the meta device (no weights, no memory): the added count is affine in each size, so it is
probed once per module and checked with a real count for the chosen sizes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from .accounting import build_meta_model, placed_counts
from .errors import MethodConfigError
from .forms import MAX_VECTORS, form_of
from .placement import resolve
from .spec import MethodSpec, ModuleSpec, load_method

MAX_LENGTH = MAX_VECTORS  # prefix / prompt vectors: far beyond any setting in the literature


@dataclass(frozen=True)
class BudgetSolution:
    spec: MethodSpec  # sizes solved, budget None
    budget: int  # the budget in added parameters
    added: int  # added parameters of `spec` (<= budget)
    sizes: dict[str, int]  # "<module>.<key>" -> solved size
    next_sizes: dict[str, int] | None  # the next step on the path (exceeds the budget), None at the cap
    next_added: int | None
    smallest: int  # added parameters at size 1 everywhere
    largest: int  # added parameters at the caps


def size_key(module: ModuleSpec) -> str:
    """The option that sets a module's size, as its form declares it (dim, length, svd's init_r...)."""
    key = form_of(module.form).size_key
    if key is None:
        raise MethodConfigError(f"budget: module '{module.name}' (form '{module.form}') has no size key to solve")
    return key


def budget_parameters(budget: str | int, base: int) -> int:
    if isinstance(budget, str):
        return math.floor(base * float(budget.rstrip("%")) / 100.0)
    return int(budget)


def _with_sizes(spec: MethodSpec, keys: list[str], sizes: list[int]) -> MethodSpec:
    """Each module at its size; options that follow the size (svd's target_r) follow in proportion."""
    for index, size in enumerate(sizes):
        module = spec.modules[index]
        spec = spec.replace_module(index, options=form_of(module.form).with_size(module.options, size))
    return spec


def _caps(meta: nn.Module, spec: MethodSpec) -> list[int]:
    placements = resolve(meta, spec)
    return [form_of(module.form).size_cap([p for p in placements if p.spec.name == module.name])
            for module in spec.modules]


def _describe(keys: list[str], spec: MethodSpec, sizes: list[int]) -> str:
    return ", ".join(f"{m.name}.{k}={s}" for m, k, s in zip(spec.modules, keys, sizes))


def _validated(resized: MethodSpec, original: MethodSpec) -> MethodSpec:
    """The resized spec through the spec checks (dataclasses.replace skips them), or why it cannot be resized."""
    try:
        return load_method(resized.to_dict())
    except MethodConfigError as exc:
        raise MethodConfigError(
            f"method '{original.name}': budget {original.budget!r} cannot resize its modules ({exc})"
        ) from None


def solve(method: Any, model_or_config: Any) -> BudgetSolution:
    """Solve the sizes of `method` (which carries a budget) for a model or its config; see the module docstring."""
    spec = load_method(method)
    if spec.budget is None:
        raise MethodConfigError(f"method '{spec.name}': no budget to solve (set budget: '0.5%' or a parameter count)")
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    keys = [size_key(m) for m in spec.modules]
    base_sizes = [getattr(m, k) for m, k in zip(spec.modules, keys)]
    unbudgeted = dataclasses.replace(spec, budget=None)
    _validated(_with_sizes(unbudgeted, keys, [2] * len(keys)), spec)  # sizes that something else pins (a template)
    with torch.device("meta"):
        meta = build_meta_model(config)

        def count(sizes: list[int]) -> int:
            return placed_counts(meta, _with_sizes(unbudgeted, keys, sizes))["added"]

        ones = [1] * len(keys)
        at_ones = placed_counts(meta, _with_sizes(unbudgeted, keys, ones))
        base = at_ones["base"]
        smallest = at_ones["added"]
        # added = constant + sum_i slope_i * size_i (every form's count is affine in its size)
        slopes = [count([2 if j == i else 1 for j in range(len(keys))]) - smallest for i in range(len(keys))]
        caps = _caps(meta, unbudgeted)
        if spec.modules[0].budget_share is not None:  # spec validation: every module has a share, or none
            return _solve_shares(spec, unbudgeted, keys, meta, base, slopes, caps, count)

    def affine(sizes: list[int]) -> int:
        return smallest + sum(k * (s - 1) for k, s in zip(slopes, sizes))

    def sizes_at(factor: Fraction) -> list[int]:
        return [max(1, math.floor(factor * b)) for b in base_sizes]

    top = min(Fraction(cap, b) for cap, b in zip(caps, base_sizes))
    steps = sorted({Fraction(s, b) for b in base_sizes for s in range(1, math.floor(top * b) + 1)} | {top})
    path: list[list[int]] = []
    for factor in steps:
        sizes = sizes_at(factor)
        if not path or sizes != path[-1]:
            path.append(sizes)
    if not path or path[0] != ones:
        path.insert(0, ones)
    largest = affine(path[-1])
    target = budget_parameters(spec.budget, base)
    where = f"method '{spec.name}': budget {spec.budget!r} ({target:,} added parameters)"
    reach = (f"reachable: {smallest:,} ({_describe(keys, spec, ones)}) to {largest:,} "
             f"({_describe(keys, spec, path[-1])})")
    if target < smallest or target > largest:
        raise MethodConfigError(f"{where} cannot be met; {reach}")
    chosen = max(i for i, sizes in enumerate(path) if affine(sizes) <= target)
    with torch.device("meta"):
        added = count(path[chosen])
        while added > target and chosen > 0:  # only if some form's count were not affine in its size
            chosen -= 1
            added = count(path[chosen])
        next_added = count(path[chosen + 1]) if chosen + 1 < len(path) else None
    if added > target:
        raise MethodConfigError(f"{where} cannot be met; {reach}")
    names = [f"{m.name}.{k}" for m, k in zip(spec.modules, keys)]
    return BudgetSolution(
        spec=_validated(_with_sizes(unbudgeted, keys, path[chosen]), spec),
        budget=target,
        added=added,
        sizes=dict(zip(names, path[chosen])),
        next_sizes=dict(zip(names, path[chosen + 1])) if chosen + 1 < len(path) else None,
        next_added=next_added,
        smallest=smallest,
        largest=largest,
    )


def _solve_shares(spec: MethodSpec, unbudgeted: MethodSpec, keys: list[str], meta: nn.Module, base: int,
                  slopes: list[int], caps: list[int], count) -> BudgetSolution:
    """Each module at the largest size whose own added count fits `budget_share` of the budget."""
    target = budget_parameters(spec.budget, base)
    sizes, nexts = [], []
    for index, (module, key) in enumerate(zip(unbudgeted.modules, keys)):
        alone = dataclasses.replace(unbudgeted, modules=(module,))
        at_one = placed_counts(meta, _with_sizes(alone, [key], [1]))["added"]  # this module's count at size 1
        share = math.floor(module.budget_share * target)
        if at_one > share:
            raise MethodConfigError(
                f"method '{spec.name}': budget {spec.budget!r} ({target:,} added parameters) gives module "
                f"'{module.name}' {share:,} (budget_share {module.budget_share:g}), below its {at_one:,} at "
                f"{key}=1")
        size = min(caps[index], 1 + (share - at_one) // slopes[index]) if slopes[index] else caps[index]
        sizes.append(size)
        nexts.append(min(size + 1, caps[index]))
    added = count(sizes)
    if added > target:  # only if some form's count were not affine in its size, or modules shared parameters
        raise MethodConfigError(f"method '{spec.name}': budget {spec.budget!r} ({target:,} added parameters) cannot "
                                f"be met with the budget shares ({added:,} at {_describe(keys, spec, sizes)})")
    names = [f"{m.name}.{k}" for m, k in zip(spec.modules, keys)]
    grows = nexts != sizes
    return BudgetSolution(
        spec=_validated(_with_sizes(unbudgeted, keys, sizes), spec), budget=target, added=added,
        sizes=dict(zip(names, sizes)), next_sizes=dict(zip(names, nexts)) if grows else None,
        next_added=count(nexts) if grows else None, smallest=count([1] * len(keys)), largest=count(caps))


def solve_budget(method: Any, model_or_config: Any) -> MethodSpec:
    """The method with its sizes solved for its budget and `budget` cleared (unchanged if it has no budget).

    model_or_config: a model (its config is used), a transformers config, a local directory or a hub id."""
    spec = load_method(method)
    if spec.budget is None:
        return spec
    return solve(spec, model_or_config).spec


__all__ = ["BudgetSolution", "solve", "solve_budget", "size_key", "budget_parameters", "MAX_LENGTH"]
