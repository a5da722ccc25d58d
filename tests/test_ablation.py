"""He et al.'s ablations as experiments: methods built from axis values, every ablation file composes and generates
its cells from the axes (invalid and duplicate cells skipped and listed, never run), a CPU-size run of one ablation
finishes, and a sweep with another sweeper records a refused combination as skipped while the others run."""

from __future__ import annotations

import itertools
import json

import pytest
from app_fixtures import make_small_sst2, make_tiny_model, records, run_cli, tiny_overrides
from hydra import compose, initialize_config_module

import unipelt
import unipelt.app.main  # noqa: F401  registers the schemas, the sweeper and the experiments
from unipelt.app.ablation import cell_key, method_from_axes, with_axes
from unipelt.app.report import main as report_main
from unipelt.errors import MethodConfigError

ABLATIONS = ("ablation_insertion", "ablation_site", "ablation_composition", "ablation_mam")


@pytest.fixture(scope="module")
def hydra_module():
    with initialize_config_module(config_module="unipelt.conf", version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    return make_tiny_model(root / "model"), make_small_sst2(root / "data", n_train=64, n_eval=32)


def _cells(name: str) -> tuple[list[dict], list[str]]:
    """The grid of an experiment without its seeds, as the ablation sweeper builds it: valid methods and refusals."""
    cfg = compose("train", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items() if k != "seed"}
    built, refused, seen = [], [], set()
    for values in itertools.product(*params.values()):
        overrides = [f"+experiment={name}", *(f"{k}={v}" for k, v in zip(params, values))]
        cell = compose("train", overrides=overrides)
        try:
            cell = with_axes(cell)
        except MethodConfigError as exc:
            refused.append(str(exc))
            continue
        if cell_key(cell) in seen:
            refused.append("duplicate")
            continue
        seen.add(cell_key(cell))
        built.append(unipelt.load_method(cell.method).to_dict())
    return built, refused


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_ablation_composes_with_a_budget_and_the_ablation_sweeper(hydra_module, name):
    cfg = compose("train", overrides=[f"+experiment={name}"], return_hydra_config=True)
    assert cfg.name == name
    assert cfg.hydra.sweeper._target_.endswith("AblationSweeper")
    assert str(cfg.hydra.sweeper.params.seed) == "1,2,3"
    assert cfg.model.config.model_type == "bert" and cfg.trainer.max_train_samples == 2000
    paper = compose("train", overrides=[f"+experiment={name}", "model=roberta_base", "trainer=glue"])
    assert paper.model.config.model_type == "roberta"  # paper size: the same cells on RoBERTa-base


def test_insertion_cells_are_the_four_of_table_3(hydra_module):
    built, refused = _cells("ablation_insertion")
    assert refused == []
    cells = {(m["modules"][0]["at"][0], m["modules"][0]["insertion"]) for m in built}
    assert cells == {(s, i) for s in ("attn", "ffn") for i in ("sequential", "parallel")}
    assert all(m["budget"] == "0.5%" and m["modules"][0]["form"] == "bottleneck" for m in built)


def test_composition_cells_skip_what_the_grammar_refuses_and_duplicates(hydra_module):
    built, refused = _cells("ablation_composition")
    composes = sorted((m["modules"][0]["compose"], str(m["modules"][0].get("scale"))) for m in built)
    assert composes == [("add", "None"), ("scale", "4.0"), ("scale", "learned"), ("sigmoid_gate", "None")]
    assert refused.count("duplicate") == 1  # compose=scale with the preset's own s = 4
    assert sum("cannot use compose 'gate'" in r for r in refused) == 3  # a bottleneck has no softmax gate
    assert sum("key 'scale' needs compose 'scale'" in r for r in refused) == 4


def test_site_cells_move_each_method_to_attention_or_ffn_at_its_own_granularity(hydra_module):
    built, refused = _cells("ablation_site")
    assert sorted(refused) == sorted(f"axes.representation: module '{m}' acts on attention heads (attn.heads, "
                                     f"cross_attn.heads); it has no 'ffn' counterpart"
                                     for m in ("prefix", "mh_pa") for _ in range(3))
    assert {m["budget"] for m in built} == {"0.1%", "0.5%", "2%"}
    sites = {(m["name"].split(":")[0], m["name"].split("=")[1], tuple(m["modules"][0]["at"])) for m in built}
    assert sites == {("prefix", "attn", ("attn.heads", "cross_attn.heads")),
                     ("mh_pa", "attn", ("attn.heads", "cross_attn.heads")),
                     ("pa", "attn", ("attn",)), ("pa", "ffn", ("ffn",)),
                     ("lora", "attn", ("attn.q", "attn.v")), ("lora", "ffn", ("ffn.up", "ffn.down"))}
    loras = [m["modules"][0] for m in built if m["name"].startswith("lora")]
    assert all(m["alpha"] == 16 and "scale" not in m for m in loras)  # alpha / r follows the solved r


def test_representation_keeps_each_granularity_and_refuses_what_has_no_counterpart():
    pa = {"name": "pa", "modules": [{"form": "bottleneck", "at": "ffn", "insertion": "parallel", "compose": "add"}]}
    lora = method_from_axes(pa, {"use": "lora", "representation": "ffn"})
    assert lora["modules"][0]["at"] == ["ffn.up", "ffn.down"] and lora["name"] == "lora:representation=ffn"
    assert method_from_axes(pa, {"use": "lora", "representation": "attn"})["modules"][0]["at"] == ["attn.q", "attn.v"]
    assert method_from_axes(pa, {"representation": "attn"})["modules"][0]["at"] == "attn"
    with pytest.raises(MethodConfigError, match=r"^axes: set axes.at or axes.representation, not both$"):
        method_from_axes(pa, {"at": "attn", "representation": "attn"})
    with pytest.raises(MethodConfigError, match=r"unknown value 'heads' \(allowed: attn, ffn\)"):
        method_from_axes(pa, {"representation": "heads"})
    with pytest.raises(MethodConfigError, match="module 'ia3' at attn.k, attn.v, ffn.act is not all heads"):
        method_from_axes(pa, {"use": "ia3", "representation": "ffn"})


def test_mam_cells_are_the_adapter_and_each_ingredient(hydra_module):
    built, refused = _cells("ablation_mam")
    assert refused == []
    assert [[m["form"] for m in spec["modules"]] for spec in built] == [["prefix"], ["bottleneck"],
                                                                         ["prefix", "bottleneck"]]


def test_method_from_axes_consequences_and_errors():
    pa = {"name": "pa", "budget": "1%", "modules": [{"form": "bottleneck", "at": "ffn", "insertion": "parallel",
                                                     "compose": "scale", "scale": 4.0, "dim": 8}]}
    assert method_from_axes(pa, {}) is None  # no axis set: the method as it is
    added = method_from_axes(pa, {"compose": "add"})
    assert "scale" not in added["modules"][0] and added["budget"] == "1%" and added["name"] == "pa:compose=add"
    prefix = method_from_axes(pa, {"form": "prefix", "at": "attn.heads", "compose": "gate"})
    assert set(prefix["modules"][0]) == {"form", "at", "insertion", "compose"}  # dim is not a prefix's key
    sized = method_from_axes(pa, {"use": "glue/mam", "sizes": {"prefix": 5, "ffn_adapter": 7}})
    assert [sized["modules"][0]["length"], sized["modules"][1]["dim"]] == [5, 7]
    with pytest.raises(MethodConfigError, match="form 'prefix' cannot act at 'ffn'"):
        method_from_axes(pa, {"use": "prefix", "at": "ffn"})
    with pytest.raises(MethodConfigError, match="axes.sizes: no module named 'adapter'"):
        method_from_axes(pa, {"sizes": {"adapter": 4}})
    with pytest.raises(MethodConfigError, match="axes.form: unknown value 'mlp'"):
        method_from_axes(pa, {"form": "mlp"})
    with pytest.raises(MethodConfigError, match="unknown method preset 'nope'"):
        method_from_axes(pa, {"use": "pa+nope"})


@pytest.mark.slow  # an end-to-end run of processes (tens of seconds): CI's slow stage
def test_cpu_size_composition_ablation_runs_and_reports_by_compose(tiny, tmp_path):
    model, data = tiny
    sweep = tmp_path / "sweep"
    run_cli(["-m", "+experiment=ablation_composition", *tiny_overrides(model, data)[:2], "logger=none",
             "trainer.max_train_samples=32", "trainer.max_eval_samples=32", "trainer.batch_size=8",
             "trainer.max_length=32", "trainer.progress=false", "method.budget=2%", "seed=1",
             f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    found = records(sweep / "results.jsonl")
    done = [r for r in found if r["status"] == "completed"]
    skipped = [r for r in found if r["status"] == "skipped"]
    assert len(done) == 4 and len(skipped) == 8
    assert len({json.dumps(r["method_spec"]["modules"][0], sort_keys=True) for r in done}) == 4
    budget = 0.02 * done[0]["params"]["total"] if "total" in done[0]["params"] else None
    for record in done:  # every cell at (just under) the same budget
        assert record["params"]["percent"] <= 2.0 and record["params"]["percent"] > 1.5
        if budget is not None:
            assert record["params"]["added"] <= budget
    assert any("cannot use compose 'gate'" in r["reason"] for r in skipped)
    assert len(list(sweep.glob("[0-9]*"))) == 4  # skipped cells never got a job folder
    assert report_main([str(sweep), "--by", "compose"]) == 0
    table = (sweep / "report_by_compose.md").read_text()
    for value in ("compose=add", "compose=scale(4.0)", "compose=scale(learned)", "compose=sigmoid_gate"):
        assert value in table
    assert (sweep / "report_by_compose.png").stat().st_size > 0


def test_refused_combination_in_a_basic_sweep_is_skipped_and_the_rest_runs(tiny, tmp_path):
    model, data = tiny
    sweep = tmp_path / "basic"
    run_cli(["-m", *tiny_overrides(model, data), "axes.use=prefix", "axes.at=ffn,attn.heads",
             f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    by_status = {r["status"]: r for r in records(sweep / "results.jsonl")}
    assert set(by_status) == {"completed", "skipped"}
    assert "form 'prefix' cannot act at 'ffn'" in by_status["skipped"]["reason"]
    assert by_status["skipped"]["method"] == "prefix:at=ffn"


def test_refused_combination_in_a_single_run_is_one_line(tiny, tmp_path):
    model, data = tiny
    proc = run_cli([*tiny_overrides(model, data), "axes.use=prefix", "axes.insertion=sequential"], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: method 'prefix:insertion=sequential' module 0: "
                                                           "form 'prefix' cannot use insertion 'sequential'")
    assert not list(tmp_path.rglob("results.jsonl"))
