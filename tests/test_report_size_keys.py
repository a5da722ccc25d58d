"""The by-axis report reads which module options are sizes from the forms, not from a list of names: a new form
whose size key is `rank` (VeRA-like) is compared across budgets without one row per size, and what training fills
in (AdaLoRA's pruned ranks) never splits rows either."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from unipelt.app.axes_report import by_axis, size_options
from unipelt.forms import FORMS, Form, option
from unipelt.sites.names import PROJECTION_SITES


@dataclass(frozen=True)
class RankOptions:
    rank: int = option(8, "the shared random matrices' rank")
    d_init: float = option(0.1, "the initial value of the scaling vector d")


class RankSizedForm(Form):
    """A toy VeRA-like form: only what the report reads (its name and its declared sizes) matters here."""

    name = "toy_rank_sized"
    Options = RankOptions
    sites = PROJECTION_SITES
    insertions = ("parallel",)
    compositions = ("add",)
    size_key = "rank"
    solved_keys = ("rank_per_layer",)  # a made-up option that training would fill in


@pytest.fixture
def rank_sized_form():
    FORMS[RankSizedForm.name] = RankSizedForm()
    yield RankSizedForm.name
    del FORMS[RankSizedForm.name]


def _record(form: str, insertion: str, seed: int, score: float, **options: object) -> dict:
    module = {"form": form, "at": ["attn.q", "attn.v"], "insertion": insertion, "compose": "add", "name": "m0",
              **options}
    spec = {"name": f"{form}-{insertion}", "train_base": "none", "train_head": True, "modules": [module]}
    return {"status": "completed", "task": "sst2", "method": spec["name"], "seed": seed, "score": score,
            "main_metric": "validation/accuracy", "greater_is_better": True, "method_spec": spec,
            "params": {"percent": 0.5, "added": 1000}, "run_id": f"{form}{insertion}{seed}{options}",
            "config": {"method.budget": "0.5%", "seed": seed}}


def test_a_forms_declared_size_and_solved_options_are_sizes(rank_sized_form):
    assert size_options(rank_sized_form) == {"rank", "rank_per_layer"}
    assert size_options("svd") == {"init_r", "target_r", "rank_pattern"}  # AdaLoRA's pruned ranks included
    assert size_options("scaling") == set()  # (IA)³ has no size


def test_a_rank_sized_form_is_one_row_whatever_rank_the_budget_solved(rank_sized_form):
    # the budget solves another rank for each insertion (equal parameters): still one comparison, not two rows
    records = [_record(rank_sized_form, "parallel", seed, 0.8 + seed / 100, rank=16, rank_per_layer=[16, 12])
               for seed in (1, 2)]
    records += [_record(rank_sized_form, "sequential", seed, 0.7, rank=24, rank_per_layer=[24, 20])
                for seed in (1, 2)]
    rows, values = by_axis(records, "insertion")
    assert values == ["parallel", "sequential"]
    assert len(rows) == 1 and rows[0].cells["parallel"].n == 2 and rows[0].cells["sequential"].n == 2


def test_an_option_that_is_not_a_size_still_splits_rows(rank_sized_form):
    records = [_record(rank_sized_form, "parallel", 1, 0.8, rank=16, d_init=0.1),
               _record(rank_sized_form, "sequential", 1, 0.7, rank=16, d_init=1.0)]
    rows, _ = by_axis(records, "insertion")
    assert len(rows) == 2


def test_svd_pruned_ranks_do_not_split_rows():
    pruned = [["encoder.0.attn.q", 3], ["encoder.0.attn.v", 5]]
    records = [_record("svd", "parallel", 1, 0.8, init_r=12, target_r=8, rank_pattern=pruned),
               _record("svd", "parallel", 2, 0.9, init_r=12, target_r=8,
                       rank_pattern=[["encoder.0.attn.q", 6], ["encoder.0.attn.v", 2]])]
    rows, _ = by_axis(records, "compose")
    assert len(rows) == 1 and rows[0].cells["add"].n == 2
