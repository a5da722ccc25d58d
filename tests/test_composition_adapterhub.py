"""Composition blocks and AdapterFusion against AdapterHub `adapters` itself, on the same weights: Pfeiffer
(SeqBnConfig) and Houlsby (DoubleSeqBnConfig) adapters on tiny BERT and RoBERTa, every adapter and fusion tensor
copied into AdapterHub's model under its own names (the mapping is here), AdapterHub run from a second venv by
benchmarks/adapterhub_composition.py. Locally a missing venv skips with how to build it; in CI (CI=true) it fails,
since .ci/run builds it.

How the blocks map (AdapterHub's names on the right):
- Stack(a, b, c) = Stack(a, b, c); BatchSplit(..., sizes=s) = BatchSplit(..., batch_sizes=s); the fusion adapter
  over [a, b, c] = Fuse(a, b, c), each fusion option under AdapterHub's own name.
- Average(a, b, c, weights=w) = Average(a, b, c, weights=3·w, normalize_weights=False): AdapterHub's bottleneck
  Average takes torch.mean over the members of w_i·(h + Δh_i) (adapters' methods/bottleneck.py, `mean`), i.e. it
  divides by the member count once more; with its own default weights (1/n each) the sub-layer output itself comes
  out scaled by 1/n.
- AdapterHub's Parallel(a, b, c) is not a sum of Δh (ours): it repeats the batch, each copy through one adapter;
  that is our BatchSplit(a, b, c, sizes=[n, n, n]) on the repeated batch. Our Parallel has no AdapterHub
  counterpart: test_composition_reference.py re-derives it by hand.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch

import unipelt
from needs import in_ci
from numerics import assert_close_scaled, assert_differs
from test_composition_reference import fusion_method, method
from tiny_models import perturb_adapters, tiny_batch, tiny_model
from unipelt.attach import state_of

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("UNIPELT_ADAPTERHUB_PYTHON", ROOT / ".venv-adapterhub" / "bin" / "python"))
SCRIPT = ROOT / "benchmarks" / "adapterhub_composition.py"
LOCATION = {"attn": "attention.output", "ffn": "output", "ffn.ln": "output"}  # AdapterHub's adapter layers
KINDS = {"pfeiffer": ("seq_bn", "ffn.ln"), "houlsby": ("double_seq_bn", ["attn", "ffn"])}
MEMBERS = ("a", "b", "c")
DYNAMIC = {"key": True, "query": True, "value": True, "query_before_ln": False, "regularization": True,
           "residual_before": False, "temperature": False, "value_before_softmax": True, "value_initialized": True,
           "dropout_prob": None}
FUSIONS = {"dynamic": {}, "static": {"value": False, "value_initialized": False, "regularization": False},
           "temperature": {"temperature": True}, "value_after_softmax": {"value_before_softmax": False},
           "residual_before": {"residual_before": True}}
B = 3
CASES = [  # id, ours, AdapterHub's, rows repeated (ours, theirs)
    ("single", "a", "a", 1, 1),
    ("stack", unipelt.Stack(*MEMBERS), {"stack": list(MEMBERS)}, 1, 1),
    ("average", unipelt.Average(*MEMBERS, weights=[0.5, 0.3, 0.2]),
     {"average": list(MEMBERS), "weights": [1.5, 0.9, 0.6], "normalize_weights": False}, 1, 1),
    ("batch_split", unipelt.BatchSplit("c", "a", "b", sizes=[1, 1, 1]),
     {"batch_split": ["c", "a", "b"], "batch_sizes": [1, 1, 1]}, 1, 1),
    ("parallel", unipelt.BatchSplit(*MEMBERS, sizes=[B] * 3), {"parallel": list(MEMBERS)}, 3, 1),
    ("fuse", "fusion", {"fuse": list(MEMBERS)}, 1, 1),
]
SCENARIOS = [(family, kind, fusion) for family in ("bert", "roberta") for kind in KINDS for fusion in FUSIONS
             if (family == "bert" or fusion == "dynamic") and not (kind == "pfeiffer" and fusion == "residual_before")]


def adapterhub_names(model, name: str, fused: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Our adapter's tensors under AdapterHub's parameter names."""
    out = {}
    for p, slot in zip(state_of(model, name).placements, state_of(model, name).slots.values()):
        at = f"{model.base_model_prefix}.encoder.layer.{p.layer}.{LOCATION[p.site]}"
        f = slot.delta_module
        if fused:
            layers = {"query": f.query, "key": f.key, "value": f.value}
            prefix = f"{at}.adapter_fusion_layer.{','.join(fused)}"
        else:
            layers = {"adapter_down.0": f.down, "adapter_up": f.up}
            prefix = f"{at}.adapters.{name}"
        for key, layer in layers.items():
            if layer is None:
                continue
            out[f"{prefix}.{key}.weight"] = layer.weight.detach().clone()
            if layer.bias is not None:
                out[f"{prefix}.{key}.bias"] = layer.bias.detach().clone()
    return out


def scenario(family: str, kind: str, fusion: str):
    """Our model (members a, b, c and the fusion over them, every tensor moved off its init) and its AdapterHub
    description."""
    config, at = KINDS[kind]
    model = tiny_model(family, attn="eager")
    base = copy.deepcopy(model)
    member = method("pfeiffer") if kind == "pfeiffer" else method("sequential")
    for index, name in enumerate(MEMBERS):
        torch.manual_seed(20 + index)
        unipelt.attach(model, member, name=name)
    unipelt.attach(model, fusion_method(at, adapters=list(MEMBERS), **FUSIONS[fusion]), name="fusion")
    perturb_adapters(model, seed=7, scale=0.3)
    tensors = {k: v for name in MEMBERS for k, v in adapterhub_names(model, name).items()}
    tensors.update(adapterhub_names(model, "fusion", MEMBERS))
    batch = tiny_batch(family, batch=B)
    cases = CASES if fusion == "dynamic" else [c for c in CASES if c[0] == "fuse"]
    theirs = {"model_type": family, "config": {k: v for k, v in model.config.to_dict().items()
                                               if k not in ("model_type", "transformers_version", "architectures")},
              "base": base.state_dict(), "tensors": tensors,
              "adapters": {name: {"config": config, "reduction_factor": 4, "non_linearity": "relu"}
                           for name in MEMBERS},
              "fusions": [{"adapters": list(MEMBERS), "config": {**DYNAMIC, **FUSIONS[fusion]}}],
              "inputs": {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
              "cases": [{"id": c[0], "setup": c[2], "repeat": c[4]} for c in cases]}
    return model, base, batch, cases, theirs


def outputs(model, batch, repeat: int = 1) -> dict[str, torch.Tensor]:
    inputs = {k: batch[k].repeat(repeat, 1) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return {"hidden_states": torch.stack(out.hidden_states), "logits": out.logits}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    if not PYTHON.exists():
        reason = (f"{PYTHON} not found: AdapterHub's side needs its own venv (python3 -m venv .venv-adapterhub && "
                  ".venv-adapterhub/bin/pip install torch==2.13.0 adapters==1.3.0)")
        if in_ci():
            pytest.fail(f"{reason} (CI is set: .ci/run builds it, so it is required there)", pytrace=False)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("adapterhub")
    ours, scenarios = {}, []
    for key in SCENARIOS:
        model, base, batch, cases, theirs = scenario(*key)
        ours[key] = {"base": outputs(base, batch)}
        for case_id, block, _, repeat, _ in cases:
            unipelt.set_active(model, block)
            ours[key][case_id] = outputs(model, batch, repeat)
        scenarios.append(theirs)
    torch.save(scenarios, folder / "in.pt")
    run = subprocess.run([str(PYTHON), str(SCRIPT), str(folder / "in.pt"), str(folder / "out.pt")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(folder / "out.pt", weights_only=True)
    return ours, {key: theirs[index] for index, key in enumerate(SCENARIOS)}


@pytest.mark.parametrize("family, kind, fusion", SCENARIOS)
def test_equal_to_adapterhub_on_the_same_weights(compared, family, kind, fusion):
    ours, theirs = compared
    key = (family, kind, fusion)
    sites = 2 if kind == "houlsby" else 1
    for case_id in theirs[key]:
        got, expected = ours[key][case_id], theirs[key][case_id]
        rows = got["logits"].shape[0]  # AdapterHub's Parallel repeats the batch after the embeddings
        hidden = torch.stack([h.repeat(rows // h.shape[0], 1, 1) for h in expected["hidden_states"]])
        base = ours[key]["base"]["hidden_states"].repeat(1, rows // B, 1, 1)
        assert_differs(got["hidden_states"], base, ops=1, reason="the adapters change the hidden states", msg=case_id)
        # per site of both layers: each member's up projection and add (one addmm here), and the fusion's products
        ops = (4 if case_id == "fuse" else 3) * sites * 2
        reason = "each adapter's up projection and residual add, and the fusion's products, at every site"
        assert_close_scaled(got["hidden_states"], hidden, ops=ops, reason=reason, msg=f"{case_id} hidden states")
        assert_close_scaled(got["logits"], expected["logits"], ops=ops + 2, reason=reason + ", and the head",
                            msg=f"{case_id} logits")
