"""merge_adapters and to_lora on a model, against PEFT on the same weights: our adapters exported to PEFT's files,
loaded into a PeftModel, merged by its add_weighted_adapter; the new adapter's factors and outputs compared with
unipelt's. (tests/test_adapter_merging.py holds the per-module mathematics to PEFT bit for bit.)"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import unipelt
from numerics import assert_close_scaled, assert_same
from tiny_models import tiny_batch, tiny_model
from unipelt.peft_interop import peft_lora_state

SEED = 7
WEIGHTS = [0.7, 0.5]
CASES = [("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.6}),
         ("dare_ties", {"density": 0.6}), ("magnitude_prune", {"density": 0.5}), ("ties_svd", {"density": 0.5})]


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def perturb(model, seed: int, adapter: str) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"unipelt_{adapter}__" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    """A tiny Llama with LoRAs 'a' and 'b' (A and B off zero), both exported to PEFT files."""
    folder = tmp_path_factory.mktemp("loras")
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    for index, name in enumerate(("a", "b")):
        unipelt.attach(model, "lora", name=name)
        perturb(model, index, name)
        unipelt.export_peft(model, folder / name, name=name)
    return base, model, folder


def peft_merged(base, folder, combination: str, options: dict, monkeypatch):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder / "a"), adapter_name="a")
    peft_model.load_adapter(str(folder / "b"), adapter_name="b")
    real, generator = torch.bernoulli, torch.Generator().manual_seed(SEED)
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: real(p, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type=combination, **options)
    monkeypatch.undo()
    peft_model.set_adapter("m")
    return peft_model


@pytest.mark.parametrize("combination,options", CASES)
def test_merge_adapters_equals_peft_add_weighted_adapter(two_loras, combination, options, monkeypatch):
    base, model, folder = two_loras
    model = copy.deepcopy(model)
    batch = tiny_batch("llama")
    peft_model = peft_merged(base, folder, combination, options, monkeypatch)
    unipelt.merge_adapters(model, ["a", "b"], WEIGHTS, combination, new_name="m",
                           generator=torch.Generator().manual_seed(SEED), **options)
    assert unipelt.active_adapters(model) == "m"
    _, ours = peft_lora_state(model, "m", "test")
    theirs = {k.replace(".m.", "."): v for k, v in peft_model.state_dict().items() if ".m." in k}
    for key, value in ours.items():
        assert key in theirs, key
        assert_same(value, theirs[key], key)
    assert_close_scaled(outputs(model, batch), outputs(peft_model, batch), ops=4,
                        reason="PEFT adds its LoRA output after the projection with its own scaling multiply")
    unipelt.delete_adapter(model, "m")


def test_to_lora_is_exact_at_the_adapters_rank_and_reports_truncation(two_loras):
    _, model, _ = two_loras
    model = copy.deepcopy(model)
    batch = tiny_batch("llama")
    unipelt.set_active(model, "a")
    expected = outputs(model, batch)
    errors = unipelt.to_lora(model, "a", rank=8, new_name="served")
    assert max(errors.values()) < 1e-5
    assert_close_scaled(outputs(model, batch), expected, ops=8,
                        reason="B·A from a float32 SVD of s·B·A against s·B·(A·x)")
    truncated = unipelt.to_lora(model, "a", rank=2)  # replaces 'a' by a rank-2 LoRA
    assert unipelt.list_adapters(model) == ["b", "served", "a"]
    assert all(0.05 < e < 1 for e in truncated.values())
    assert unipelt.count_parameters(model, name="a")["added"] * 4 == unipelt.count_parameters(model, name="b")["added"]


def test_ia3_to_lora_serves_through_peft_and_refusals(two_loras, tmp_path):
    base, _, _ = two_loras
    model = copy.deepcopy(base)
    batch = tiny_batch("llama")
    unipelt.attach(model, "ia3", name="scales")
    perturb(model, 3, "scales")
    expected = outputs(model, batch)
    errors = unipelt.to_lora(model, "scales", rank=64)  # full rank of the tiny projections: exact
    assert max(errors.values()) < 1e-5
    assert_close_scaled(outputs(model, batch), expected, ops=16,
                        reason="(IA)³'s l⊙(Wx) against x(W + SVD factors of diag(l−1)W) in float32")
    # served: PEFT loads the converted LoRA onto the original base and gives the (IA)³ outputs
    from peft import PeftModel

    unipelt.export_peft(model, tmp_path / "served", name="scales")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "served"))
    assert_close_scaled(outputs(peft_model, batch), expected, ops=16,
                        reason="(IA)³'s l⊙(Wx) against Wx + B(Ax) from SVD factors of diag(l−1)W in float32")
    unipelt.attach(model, "prefix", name="p")
    with pytest.raises(unipelt.AttachError, match=r"to_lora: .*cannot be expressed as PEFT LoRA.*does not fold"):
        unipelt.to_lora(model, "p", rank=4)
    with pytest.raises(unipelt.AttachError, match=r"merge_adapters: combination 'mean' is not one of"):
        unipelt.merge_adapters(model, ["scales"], [1.0], "mean")
    with pytest.raises(unipelt.AttachError, match=r"merge_adapters: an adapter named 'p' already exists"):
        unipelt.merge_adapters(model, ["scales"], [1.0], new_name="p")
    with pytest.raises(unipelt.AttachError, match=r"merge_adapters: 1 weights for 2 adapters"):
        unipelt.merge_adapters(model, ["scales", "p"], [1.0])
    with pytest.raises(unipelt.AttachError, match=r"adapter 'p' has no weight update|cannot be expressed"):
        unipelt.merge_adapters(model, ["scales", "p"], [1.0, 1.0], "svd")
    assert unipelt.list_adapters(model) == ["scales", "p"]
