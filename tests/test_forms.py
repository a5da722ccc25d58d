"""The form contract: every registered form declares what the spec layer checks, and a new form written here, in
one class, runs through validation, attach, counting, merge and save/load with no edit anywhere else."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import unipelt
from unipelt.compose import Composer
from unipelt.forms import FORMS, Built, Counts, Form, option
from unipelt.sites.names import ALL_AT, PROJECTION_SITES
from unipelt.slot import LinearMap, Slot
from unipelt.spec import COMPOSITIONS, INSERTIONS
from unipelt.spec_values import expect
from numerics import assert_close_scaled, assert_same
from tiny_models import tiny_batch, tiny_model


@pytest.mark.parametrize("name", sorted(FORMS))
def test_every_form_declares_its_contract(name):
    form = FORMS[name]
    assert form.name == name
    assert dataclasses.is_dataclass(form.Options) and form.Options.__dataclass_params__.frozen
    assert all(help_text for help_text in form.option_help().values()), "every option needs its help text"
    assert set(form.sites) <= set(ALL_AT) and form.sites
    assert set(form.insertions) <= set(INSERTIONS) and form.insertions
    assert set(form.compositions) <= set(COMPOSITIONS) and form.compositions
    assert form.size_key is None or form.size_key in form.option_names()
    form.Options()  # every option has a default


@dataclass(frozen=True)
class ShiftOptions:
    start: float = option(0.0, "the initial value of every component of b", expect(float))


class Shift(nn.Module):
    def __init__(self, d_in: int, d_out: int, start: float) -> None:
        super().__init__()
        self.d_in = d_in
        self.shift = nn.Parameter(torch.full((d_out,), start))

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.shift.to(source.dtype).expand(*source.shape[:-1], -1)

    def linear_map(self) -> LinearMap:  # Δh = 0·x + b
        return LinearMap(torch.zeros(self.shift.shape[0], self.d_in), self.shift.detach())


class ShiftForm(Form):
    """A toy form: a learned vector b added to h (Δh = b)."""

    name = "shift"
    Options = ShiftOptions
    sites = PROJECTION_SITES
    insertions = ("parallel",)
    compositions = ("add", "scale")

    def build(self, spec, placements, model, modules) -> Built:
        return Built([Slot(spec, Shift(p.d_in, p.d_out, spec.options.start), Composer(spec, p.d_in), p.site, p.chunk)
                      for p in placements])

    def count(self, spec, placements) -> Counts:
        total = sum(p.d_out + Composer.parameter_count(spec, p.d_in) for p in placements)
        return Counts(added=total, trainable=total)


@pytest.fixture
def shift_form():
    FORMS["shift"] = ShiftForm()
    try:
        yield FORMS["shift"]
    finally:
        del FORMS["shift"]


def test_a_new_form_is_one_class(shift_form, tmp_path):
    method = {"name": "shifted", "modules": [{"form": "shift", "at": "ffn.down", "insertion": "parallel",
                                              "compose": "scale", "scale": 2.0, "start": 0.5}]}
    with pytest.raises(unipelt.MethodConfigError, match=r"unknown key 'dim' for form 'shift' \(allowed: .*start"):
        unipelt.load_method({**method, "modules": [{**method["modules"][0], "dim": 4}]})
    with pytest.raises(unipelt.MethodConfigError, match=r"form 'shift' cannot act at 'ffn'"):
        unipelt.load_method({**method, "modules": [{**method["modules"][0], "at": "ffn"}]})
    model, batch = tiny_model("bert"), tiny_batch("bert")
    with torch.no_grad():
        down = model.bert.encoder.layer[0].output.dense
        x = torch.randn(2, 3, down.in_features)
        base = down(x)
    counted = unipelt.count_parameters(model, method)
    unipelt.attach(model, method)
    assert unipelt.count_parameters(model)["added"] == counted["added"] == 2 * 32  # two layers, d = 32
    with torch.no_grad():
        assert_same(down(x), base + 2.0 * 0.5)  # h + s·b; s·b = 1 exactly, so both round h + 1 once
        out = model(**batch).logits
    unipelt.save_adapter(model, tmp_path)
    assert unipelt.merge(model)["merged"]
    with torch.no_grad():
        assert_close_scaled(model(**batch).logits, out, ops=4,
                            reason="the sum bias + s·b, and x·W + (bias + s·b) against (x·W + bias) + s·b, at the 2 "
                                   "layers' ffn.down")
    unipelt.unmerge(model)
    fresh = tiny_model("bert")
    unipelt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert_same(fresh(**batch).logits, out)  # the same b through the same operations


def test_a_shared_training_aid_trains_at_its_module_lr():
    model = tiny_model("bert")
    unipelt.attach(model, {"name": "p", "modules": [{"form": "prefix", "name": "prefix", "at": "attn.heads",
                                                     "insertion": "parallel", "compose": "gate", "length": 2,
                                                     "mlp_dim": 8, "lr": 0.5}]})
    groups = unipelt.param_groups(model, lr=0.01)
    reparam = [name for group in groups if group["lr"] == 0.5 for name in group["names"]]
    assert any(name.startswith("unipelt_prefix_reparam.") for name in reparam)
