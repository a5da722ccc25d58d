"""Equal-budget comparisons: method.budget solves the module sizes (meta device, paper accounting)."""

from __future__ import annotations

import math
import re

import pytest

import unipelt
from unipelt.attach import state_of
from unipelt.budget import solve, solve_budget
from unipelt.cli.count import main as count_main, model_config
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def bert_base():
    return model_config("bert_base")


def with_budget(preset: str, budget) -> dict:
    return {**unipelt.load_method(preset).to_dict(), "budget": budget}


@pytest.mark.parametrize("preset", ["lora", "prefix", "pfeiffer", "mam"])
def test_half_percent_on_bert_base(bert_base, preset):
    solution = solve(with_budget(preset, "0.5%"), bert_base)
    base = unipelt.count_parameters(bert_base, preset)["base"]
    assert base == 109_482_240  # BERT-base without a head
    assert solution.budget == math.floor(0.005 * base)
    # An independent count of the solved spec agrees, stays within the budget, and the next step would exceed it.
    counts = unipelt.count_parameters(bert_base, solution.spec)
    assert counts["added"] == solution.added <= solution.budget
    assert solution.next_added is not None and solution.next_added > solution.budget
    next_spec = {**solution.spec.to_dict(), "modules": _resized(solution.spec, solution.next_sizes)}
    assert unipelt.count_parameters(bert_base, next_spec)["added"] == solution.next_added
    assert solve_budget(solution.spec, bert_base) == solution.spec  # no budget: unchanged
    assert solution.spec.budget is None
    # One size step apart: the next sizes differ from the solved ones by at most one in each key, and in some key.
    steps = [solution.next_sizes[k] - v for k, v in solution.sizes.items()]
    assert all(0 <= s <= 1 for s in steps) and any(steps)


def _resized(spec, sizes: dict[str, int]) -> list[dict]:
    modules = spec.to_dict()["modules"]
    for module in modules:
        for key, value in sizes.items():
            name, _, size_key = key.partition(".")
            if module["name"] == name:
                module[size_key] = value
    return modules


def test_single_module_sizes_match_the_formula(bert_base):
    # LoRA on q and v of 12 layers: r·(768 + 768) per projection, 24 projections.
    solution = solve(with_budget("lora", "0.5%"), bert_base)
    per_rank = 24 * (768 + 768)
    assert solution.sizes == {"m0.dim": solution.budget // per_rank}
    assert solution.added == per_rank * (solution.budget // per_rank)


def test_mam_keeps_the_ratio(bert_base):
    # MAM GLUE setting l=16, r=16: equal sizes in the spec stay equal after solving.
    spec = with_budget("mam", "1%")
    spec["modules"][0]["length"] = 16
    spec["modules"][1]["dim"] = 16
    solution = solve(spec, bert_base)
    assert solution.sizes["prefix.length"] == solution.sizes["ffn_adapter.dim"] > 1


def test_parameter_count_budget(bert_base):
    solution = solve(with_budget("pfeiffer", 100_000), bert_base)
    assert solution.budget == 100_000
    assert solution.added <= 100_000 < solution.next_added


def test_attach_solves_the_budget():
    model = tiny_model("bert")
    unipelt.attach(model, with_budget("lora", 2_000))
    attached = state_of(model).method
    assert attached.budget is None
    # tiny BERT: 2 layers x q, v, r·(32 + 32) each = 256·r <= 2000 -> r = 7
    assert attached.modules[0].dim == 7
    assert unipelt.count_parameters(model)["added"] == 7 * 256


def test_count_parameters_with_a_budget(bert_base):
    counts = unipelt.count_parameters(bert_base, with_budget("prefix", "0.5%"))
    assert counts["added"] == solve(with_budget("prefix", "0.5%"), bert_base).added


@pytest.mark.parametrize(
    "preset, budget, match",
    [
        ("lora", 1000, r"method 'lora': budget 1000 \(1,000 added parameters\) cannot be met; reachable: 36,864 "
                       r"\(m0\.dim=1\) to 28,311,552 \(m0\.dim=768\)"),
        ("prefix", "50%", r"budget '50%' \(54,741,120 added parameters\) cannot be met; reachable: 18,432 "
                          r"\(m0\.length=1\) to 18,874,368 \(m0\.length=1024\)"),
    ],
    ids=["too-small", "too-large"],
)
def test_budget_out_of_reach(bert_base, preset, budget, match):
    with pytest.raises(unipelt.MethodConfigError, match=match) as exc_info:
        solve(with_budget(preset, budget), bert_base)
    assert "\n" not in str(exc_info.value)


def test_cli_prints_solved_sizes(capsys):
    assert count_main(["method=lora", "model=bert_base", "budget=0.5%"]) == 0
    out = capsys.readouterr().out
    assert "budget 0.5% = 547,411 added parameters; solved sizes: m0.dim=14" in out
    assert re.search(r"^added \(paper accounting\)\s+516,096$", out, re.MULTILINE)


def test_cli_without_budget_still_works(capsys):
    assert count_main(["method=lora", "model=bert_base"]) == 0
    assert "294,912" in capsys.readouterr().out  # r=8: 24 · 8 · 1536


def test_cli_budget_error(capsys):
    assert count_main(["method=bitfit", "model=bert_base", "budget=0.5%"]) == 2
    assert "budget '0.5%' needs a module with a size to solve" in capsys.readouterr().err


def test_budget_round_trips_through_to_dict():
    spec = unipelt.load_method(with_budget("lora", "0.5%"))
    assert spec.budget == "0.5%" and unipelt.load_method(spec.to_dict()) == spec
    assert "budget" not in unipelt.load_method("lora").to_dict()  # adapter files without a budget are unchanged


def test_cli_accepts_the_hydra_style_key(capsys):
    assert count_main(["method=prefix", "model=bert_base", "method.budget=534528"]) == 0
    assert "solved sizes: m0.length=29" in capsys.readouterr().out  # 29 · 2 · 768 · 12 = 534,528 exactly


def test_a_resized_lora_keeps_alpha_so_its_scale_is_alpha_over_r(bert_base):
    """Hu et al. (and He et al.'s code: scaling = lora_alpha / r) keep alpha fixed when r changes, so a LoRA resized
    by a budget is scaled by alpha / r_solved; a fixed-factor module (the scaled PA's s = 4) keeps its factor."""
    for budget in ("0.1%", "2%"):
        (module,) = solve(with_budget("lora", budget), bert_base).spec.modules
        assert module.options.alpha == 16 and module.scale == pytest.approx(16 / module.options.dim)
    (module,) = solve(with_budget("scaled_pa", "2%"), bert_base).spec.modules
    assert module.options.alpha is None and module.scale == 4.0
    model = tiny_model("bert")
    unipelt.attach(model, with_budget("lora", 4_000))
    (slot, *_) = state_of(model).slots.values()
    assert slot.spec.scale == pytest.approx(16 / slot.spec.options.dim) and slot.spec.options.dim != 8
