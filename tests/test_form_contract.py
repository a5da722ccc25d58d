"""The form contract, finished: a form written in one file (here, in this test) that uses every optional part of
the protocol (host accessor, mergeable ΔW, PEFT export, its own size key) goes through attach, merge, counting,
a budget, save / load, PEFT export, the by-axis report and the shared tester with no edit anywhere else; and
attach is all or nothing (a form that raises at the last site leaves the model exactly as it was)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from needs import need_module
from torch import nn

import unipelt
from numerics import assert_close_scaled, assert_same
from test_invariants import run_shared_tester
from tiny_models import FAMILIES, tiny_batch, tiny_model
from unipelt.app.axes_report import by_axis
from unipelt.attach import state_of
from unipelt.compose import Composer
from unipelt.forms import FORMS, Built, Counts, Delta, Form, PeftLora, option
from unipelt.forms.bottleneck import BottleneckForm
from unipelt.sites.names import ALL_LINEAR, PROJECTION_SITES
from unipelt.slot import LinearMap, Slot, chunk_rows
from unipelt.spec_values import positive_int_value

# ---- a toy form: LoRA whose update is scaled by the mean |W| of the weight it sits on, read live ----------------


@dataclass(frozen=True)
class HostScaledOptions:
    rank: int = option(4, "rank of B·A", positive_int_value)


class HostScaledDelta(Delta):
    """Δh = c·B·A·x with c = mean |W| of the host's (rows of its) weight, read through the host accessor at every
    call, so it follows whatever the host is now (a 4-bit layer after QLoRA's quantization, a merged weight)."""

    def __init__(self, d_in: int, d_out: int, rank: int, chunk: tuple[int, int] | None) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.up = nn.Parameter(torch.zeros(d_out, rank))
        self.chunk = chunk
        self.bound_to: list[str] = []  # what bind_host was handed (the test reads it)

    def bind_host(self, host) -> None:
        super().bind_host(host)
        self.bound_to.append(type(host.module).__name__)

    def host_scale(self) -> torch.Tensor:
        weight = self.host_ref.weight()
        return weight[chunk_rows(self.chunk, weight.shape[0])].detach().abs().mean().to(self.up.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host_scale() * ((x.to(self.down.dtype) @ self.down.T) @ self.up.T)

    def linear_map(self) -> LinearMap:
        return LinearMap(self.host_scale() * (self.up @ self.down))


class HostScaledForm(Form):
    name = "toy_host_scaled"
    Options = HostScaledOptions
    sites = PROJECTION_SITES + (ALL_LINEAR,)
    insertions = ("parallel",)
    compositions = ("add", "scale", "sigmoid_gate")
    size_key = "rank"

    def build(self, spec, placements, model, modules) -> Built:
        return Built([Slot(spec, HostScaledDelta(p.d_in, p.d_out, spec.options.rank, p.chunk), Composer(spec, p.d_in),
                           p.site, p.chunk) for p in placements])

    def count(self, spec, placements) -> Counts:
        total = sum(spec.options.rank * (p.d_in + p.d_out) + Composer.parameter_count(spec, p.d_in)
                    for p in placements)
        return Counts(added=total, trainable=total)

    def merges(self, spec) -> bool:
        return spec.compose != "sigmoid_gate"  # a gate depends on the input: it cannot fold into W

    def starts_as_identity(self, spec) -> bool:
        return True

    def peft_lora_export(self, slot: Slot) -> PeftLora | str:
        delta = slot.delta_module
        return PeftLora(a=delta.down, b=delta.host_scale() * delta.up, scale=float(slot.composer.merge_factor()))


TOY = {"name": "toy", "modules": [{"form": "toy_host_scaled", "at": ["attn.q", "attn.v"], "insertion": "parallel",
                                   "compose": "scale", "scale": 2.0, "rank": 4}]}


@pytest.fixture
def toy_form():
    FORMS[HostScaledForm.name] = HostScaledForm()
    yield HostScaledForm.name
    del FORMS[HostScaledForm.name]


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _train(model, batch, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_shared_tester_runs_a_toy_form(toy_form, family, tmp_path):
    run_shared_tester(family, TOY, tmp_path)


def test_a_toy_form_counts_solves_a_budget_and_round_trips(toy_form, tmp_path):
    model, batch = tiny_model("bert"), tiny_batch("bert")
    counts = unipelt.count_parameters(model, TOY)
    assert counts["added"] == 2 * 2 * 4 * (32 + 32)  # 2 layers x {q, v} x r·(d_in + d_out)
    budget = {**TOY, "budget": counts["added"] * 2}
    unipelt.attach(model, budget)
    assert unipelt.load_method(unipelt.optim.method_of(model)).modules[0].options.rank == 8  # its own size key
    assert unipelt.count_parameters(model)["added"] == counts["added"] * 2
    _train(model, batch)
    trained = _logits(model, batch)
    unipelt.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model("bert")
    unipelt.load_adapter(fresh, tmp_path / "adapter")
    assert_same(_logits(fresh, batch), trained)


def test_a_toy_form_reads_its_host_live_merges_and_exports(toy_form, tmp_path):
    peft = need_module("peft")
    model, batch = tiny_model("llama", seed=1), tiny_batch("llama")
    unipelt.attach(model, TOY)
    _train(model, batch)
    slots = list(state_of(model).slots.values())
    assert all(s.delta_module.bound_to == ["Linear"] for s in slots)
    unmerged = _logits(model, batch)
    report = unipelt.merge(model)
    assert len(report["merged"]) == len(slots) and not report["unmerged"]
    assert_close_scaled(_logits(model, batch), unmerged, ops=2 * model.config.num_hidden_layers,
                        reason="(W + s·c·BA)·x against W·x + s·c·B·A·x in each merged layer")
    unipelt.unmerge(model)
    directory = unipelt.export_peft(model, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama", seed=1), str(directory)).eval()
    assert_close_scaled(_logits(theirs, batch), unmerged, ops=2 * model.config.num_hidden_layers,
                        reason="c·B multiplied before the file is written, B·(A·x) scaled after in PEFT")


def test_a_toy_forms_host_accessor_sees_the_4bit_layer(toy_form):
    need_module("bitsandbytes")
    model, batch = tiny_model("llama"), tiny_batch("llama")
    unipelt.attach(model, {**TOY, "quantize": "nf4", "compute_dtype": "float32"})
    slots = list(state_of(model).slots.values())
    assert all(s.delta_module.bound_to == ["Linear4bit"] for s in slots)  # handed over after quantization
    assert all(type(s.delta_module.host).__name__ == "Linear4bit" for s in slots)
    _logits(model, batch)


def test_a_toy_form_is_one_row_of_the_by_axis_report(toy_form):
    records = []
    for compose in ("add", "sigmoid_gate"):  # at one budget, the gate's own parameters leave room for a lower rank
        module = {k: v for k, v in TOY["modules"][0].items() if k != "scale"}
        method = {"name": f"toy_{compose}", "budget": 2048, "modules": [{**module, "compose": compose}]}
        model = tiny_model("bert")
        unipelt.attach(model, method)
        spec = unipelt.optim.method_of(model).to_dict()
        for seed in (1, 2):
            records.append({"status": "completed", "task": "sst2", "method": spec["name"], "seed": seed,
                            "score": 0.5 + seed / 10, "main_metric": "validation/accuracy", "greater_is_better": True,
                            "method_spec": spec, "params": unipelt.count_parameters(model),
                            "run_id": f"{compose}{seed}", "config": {"method.budget": 2048, "seed": seed}})
    ranks = {r["method_spec"]["modules"][0]["rank"] for r in records}
    assert len(ranks) == 2  # two different solved sizes ...
    rows, values = by_axis(records, "compose")
    assert values == ["add", "sigmoid_gate"] and len(rows) == 1  # ... compared in one row


# ---- attach is all or nothing --------------------------------------------------------------------------------


class RaisingSlot(Slot):
    """Registers its hooks, then refuses, as a form whose install fails half-way would."""

    raise_here = False

    def install(self, placement, modules, model):
        handles = super().install(placement, modules, model)
        if self.raise_here:
            raise RuntimeError("install refused at the last site")
        return handles


class RaisesAtLastSiteForm(BottleneckForm):
    name = "toy_raises_at_last_site"

    def build(self, spec, placements, model, modules) -> Built:
        built = super().build(spec, placements, model, modules)
        slots = [RaisingSlot(s.spec, s.form, s.composer, s.site, s.chunk) for s in built.slots]
        slots[-1].raise_here = True
        return Built(slots, built.children, built.controllers)


@pytest.fixture
def raising_form():
    FORMS[RaisesAtLastSiteForm.name] = RaisesAtLastSiteForm()
    yield RaisesAtLastSiteForm.name
    del FORMS[RaisesAtLastSiteForm.name]


def _structure(model) -> dict:
    """Everything attach may touch: module tree, tensors, hooks, the config each module holds, flags, mode."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return {
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "state": {k: (v.dtype, v.device, v.clone()) for k, v in model.state_dict().items()},
        "hooks": {n: tuple(len(getattr(m, h, {}) or {}) for h in hooks) for n, m in model.named_modules()},
        "configs": {n: id(m.__dict__.get("config")) for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": set(model.__dict__),
    }


def _assert_same_structure(after: dict, before: dict) -> None:
    for key in ("modules", "hooks", "configs", "requires_grad", "attrs"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for name, (dtype, device, value) in after["state"].items():
        assert (dtype, device) == before["state"][name][:2], name
        assert_same(value, before["state"][name][2], msg=name)


RAISING = {"name": "raising", "modules": [
    {"form": "prefix", "at": "attn.heads", "insertion": "parallel", "compose": "gate", "length": 3, "mlp_dim": 8},
    {"form": "toy_raises_at_last_site", "at": "all_linear", "insertion": "parallel", "compose": "scale",
     "scale": 2.0, "dim": 2, "activation": "none", "init": "lora"},
]}


@pytest.mark.parametrize("quantize", ["none", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attach_that_fails_at_the_last_site_leaves_the_model_as_it_was(raising_form, family, quantize):
    if quantize == "nf4":
        need_module("bitsandbytes")
    model, batch = tiny_model(family), tiny_batch(family)
    model.train()  # a mode attach must also leave alone
    before_out = _logits(model, batch)
    model.train()
    before = _structure(model)
    method = {**RAISING, "quantize": quantize, **({"compute_dtype": "float32"} if quantize == "nf4" else {})}
    with pytest.raises(RuntimeError, match="install refused at the last site"):
        unipelt.attach(model, method)
    assert not unipelt.is_attached(model)
    _assert_same_structure(_structure(model), before)
    assert_same(_logits(model, batch), before_out)
    unipelt.attach(model, "lora")  # and the model takes a method as if nothing had happened
    assert unipelt.is_attached(model)
