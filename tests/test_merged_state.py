"""Every operation on an attached model in every state (attached, merged, disabled, quantized) is either correct or
refused with one line, and a refusal leaves the model as it was. Merge / unmerge / detach give back the original
weights bit for bit (issue 12, item 1)."""

from __future__ import annotations

import warnings

import pytest
import torch

import unipelt
from numerics import assert_close_scaled, assert_differs, assert_same
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

HYBRID = {"name": "hybrid", "modules": [  # two modules on one projection, a learned scale, a fused GPT-2 c_attn
    {"form": "bottleneck", "name": "a", "at": ["attn.q", "attn.v"], "insertion": "parallel", "compose": "scale",
     "scale": 2.0, "dim": 4, "activation": "none", "init": "lora"},
    {"form": "bottleneck", "name": "b", "at": ["attn.q", "ffn.up"], "insertion": "parallel", "compose": "scale",
     "scale": "learned", "dim": 2, "activation": "none", "init": "lora"}]}


def perturbed(model, seed: int = 0):
    """Give every adapter parameter a large random value (LoRA's B starts at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".unipelt_" in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * 3)
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".unipelt_" not in f".{n}"}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max diff {(a[name] - b[name]).abs().max()}"


def outputs(model, family: str) -> torch.Tensor:
    batch = {k: v for k, v in tiny_batch(family).items() if k != "labels"}
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_detach_after_merge_is_bit_exact(family):
    model = tiny_model(family)
    base = weights(model)
    perturbed(unipelt.attach(model, HYBRID))
    before = outputs(model, family)
    unipelt.merge(model)
    assert_close_scaled(outputs(model, family), before, ops=2 * len(state_of(model).merged),  # merged = unmerged
                        reason="the sum W + s·BA, and (W + s·BA)·x against W·x + s·B(A·x), at each merged slot")
    assert not torch.equal(weights(model)[next(iter(state_of(model).merged)).rpartition(".")[0] + ".weight"],
                           base[next(iter(state_of(model).merged)).rpartition(".")[0] + ".weight"])
    unipelt.unmerge(model)
    assert_bit_equal(weights(model), base)
    unipelt.merge(model)
    unipelt.detach(model)  # detach unmerges first
    assert_bit_equal(weights(model), base)


def test_load_adapter_onto_a_merged_model_is_refused_and_nothing_changes(tmp_path):
    """The issue's reproduction: attach, perturb, merge, load another adapter, unmerge, detach: base weights off by
    up to 6.3 (unmerge subtracted the newly loaded ΔW). Now the load is refused and the end is bit-exact."""
    other = perturbed(unipelt.attach(tiny_model("bert"), "lora"), seed=1)
    unipelt.save_adapter(other, tmp_path / "other")
    model = tiny_model("bert")
    base = weights(model)
    perturbed(unipelt.attach(model, "lora"))
    unipelt.merge(model)
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(unipelt.AdapterFileError) as info:
        unipelt.load_adapter(model, tmp_path / "other")
    assert str(info.value) == "load_adapter: modules are merged into the weights; call unipelt.unmerge first"
    assert_bit_equal({n: p.detach() for n, p in model.named_parameters()}, merged)
    unipelt.unmerge(model)
    unipelt.detach(model)
    assert_bit_equal(weights(model), base)


def test_unmerge_after_the_weights_changed_subtracts_the_recorded_delta_and_says_so():
    model = tiny_model("bert")
    perturbed(unipelt.attach(model, {"name": "lt", "train_base": "all", "modules": [
        {"form": "bottleneck", "at": "attn.q", "insertion": "parallel", "compose": "scale", "scale": 2.0, "dim": 4,
         "activation": "none", "init": "lora"}]}))
    host = model.bert.encoder.layer[0].attention.self.query
    original = host.weight.detach().clone()
    unipelt.merge(model)
    delta = host.weight.detach() - original
    with torch.no_grad():
        host.weight.add_(0.5)  # a training step on the merged weight (train_base: all)
        host.unipelt_m0_attn_q.form.up.weight.mul_(7)  # adapter edited too
    with pytest.warns(UserWarning, match="changed after merge"):
        unipelt.unmerge(model)
    # the ΔW that merge() added is subtracted (not the adapter's current one): the 0.5 step survives
    terms = float((original.abs() + delta.abs()).max()) + 0.5  # the sizes of what was added and subtracted
    assert_close_scaled(host.weight.detach(), original + 0.5, ops=3, scale=terms,
                        reason="W + ΔW, + 0.5 and − ΔW, each rounded at the size of the terms")
    assert delta.abs().max() > 1


def test_merge_refuses_non_finite_deltas_and_merges_nothing():
    model = tiny_model("bert")
    perturbed(unipelt.attach(model, HYBRID))
    base = weights(model)
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.unipelt_b_attn_q.composer.learned_scale.fill_(float("nan"))
    with pytest.raises(unipelt.AttachError, match=r"^merge: module 'bert.encoder.layer.1.attention.self.query."
                                                   r"unipelt_b_attn_q' has nan values in its ΔW; nothing was merged$"):
        unipelt.merge(model)
    assert not state_of(model).merged
    assert_bit_equal(weights(model), base)


def test_merge_inside_disabled_is_refused():
    model = perturbed(unipelt.attach(tiny_model("bert"), "lora"))
    base = weights(model)
    with unipelt.disabled(model):
        with pytest.raises(unipelt.AttachError, match=r"^merge: called inside unipelt.disabled\(model\); merge after "
                                                      r"the block$"):
            unipelt.merge(model)
        with pytest.raises(unipelt.AttachError, match="inside unipelt.disabled"):
            unipelt.param_groups(model, 1e-3)
    assert_bit_equal(weights(model), base)
    assert not state_of(model).merged


def _merged_operations(tmp_path):
    saved = tmp_path / "saved"
    unipelt.save_adapter(perturbed(unipelt.attach(tiny_model("bert"), "lora")), saved)
    return {
        "save_adapter": (lambda m: unipelt.save_adapter(m, tmp_path / "out"),
                         "save_adapter: modules are merged into the weights; call unipelt.unmerge first"),
        "export_peft": (lambda m: unipelt.export_peft(m, tmp_path / "out"),
                        "export_peft: modules are merged into the weights; call unipelt.unmerge first"),
        "load_adapter": (lambda m: unipelt.load_adapter(m, saved),
                         "load_adapter: modules are merged into the weights; call unipelt.unmerge first"),
        "disabled": (lambda m: unipelt.disabled(m).__enter__(),
                     "disabled: modules are merged into the weights; call unipelt.unmerge(model) first"),
        "param_groups": (lambda m: unipelt.param_groups(m, 1e-3),
                         "param_groups: modules are merged into the weights and would not train; call "
                         "unipelt.unmerge(model) first"),
        "attach": (lambda m: unipelt.attach(m, "lora"),
                   "attach: an adapter named 'default' (method 'lora') is already attached; pass another name=, or call "
                   "unipelt.detach(model) first"),
        "import_peft": (lambda m: unipelt.import_peft(m, saved),
                        "import_peft: an adapter named 'default' (method 'lora') is already attached; pass another "
                        "name=, or call unipelt.detach(model) first"),
    }


def test_every_operation_on_a_merged_model_is_correct_or_refused(tmp_path):
    operations = _merged_operations(tmp_path)
    model = tiny_model("bert")
    base = weights(model)
    perturbed(unipelt.attach(model, "lora"))
    unipelt.merge(model)
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, (call, message) in operations.items():
        with pytest.raises(unipelt.UnipeltError) as info:
            call(model)
        assert str(info.value) == message, name
        assert_bit_equal({n: p.detach() for n, p in model.named_parameters()}, merged)
        assert not (tmp_path / "out").exists(), name
    # the operations that are allowed: merge again (a no-op), count, fold (no prefix here), then unmerge twice
    assert unipelt.merge(model)["merged"] == []
    assert unipelt.count_parameters(model)["added"] > 0
    unipelt.fold_prefixes(model)
    assert len(unipelt.unmerge(model)) == 4 and unipelt.unmerge(model) == []
    unipelt.detach(model)
    assert_bit_equal(weights(model), base)


def test_quantized_merge_then_detach_restores_the_original_model():
    pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    base = weights(model)
    perturbed(unipelt.attach(model, "qlora"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unipelt.merge(model)
    with pytest.raises(unipelt.AdapterFileError, match="merged into the weights"):
        unipelt.save_adapter(model, "unused")
    unipelt.detach(model)
    assert_bit_equal(weights(model), base)


@pytest.mark.parametrize("call", ["attach", "import_peft", "load_adapter"])
def test_a_peft_model_is_named_as_such(tmp_path, call):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=2, target_modules=["query"]))
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(unipelt.AttachError) as info:
        {"attach": lambda: unipelt.attach(model, "lora"), "import_peft": lambda: unipelt.import_peft(model, tmp_path),
         "load_adapter": lambda: unipelt.load_adapter(model, tmp_path)}[call]()
    assert str(info.value) == (f"{call}: got a PEFT PeftModel; unipelt works on the transformers model itself: pass "
                               "model.get_base_model() (or model.merge_and_unload() to keep PEFT's LoRA)")
    assert [n for n, _ in model.named_parameters()] == names


# ---- found by attacking the operations (issue 12: beyond the list) ---------------------------------------------

@pytest.mark.parametrize("family, method", [("bert", "lora"), ("bert", "unipelt"), ("gpt2", "prompt_tuning"),
                                            ("t5", "mam")])
def test_a_deep_copy_is_a_model_of_its_own(family, method):
    """copy.deepcopy copied the hooks by reference: the copy kept calling the original's modules (its own adapter
    parameters had no effect; UniPELT's gates crashed)."""
    import copy

    model = perturbed(unipelt.attach(tiny_model(family), method))
    before = outputs(model, family)
    clone = copy.deepcopy(model)
    assert_same(outputs(clone, family), before)  # the same weights through the same operations
    perturbed(clone, seed=5)
    assert_differs(outputs(clone, family), before, ops=1, reason="the copy follows its own parameters")
    assert torch.equal(outputs(model, family), before)  # and the original is untouched
    unipelt.detach(clone)
    assert_same(outputs(clone, family), outputs(tiny_model(family), family))
    assert torch.equal(outputs(model, family), before)


def test_adapter_files_that_would_load_wrong_are_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = perturbed(unipelt.attach(tiny_model("bert"), "lora"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(unipelt.AdapterFileError, match=r"^save_adapter: cannot create the folder .*a_file \("):
        unipelt.save_adapter(model, tmp_path / "a_file")
    with pytest.raises(unipelt.AdapterFileError, match=r"^export_peft: cannot create the folder .*a_file \("):
        unipelt.export_peft(model, tmp_path / "a_file")
    unipelt.save_adapter(model, tmp_path / "ints")
    weights = tmp_path / "ints" / "adapter_model.safetensors"
    save_file({k: v.to(torch.int64) for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(unipelt.AdapterFileError, match=r"^load_adapter: tensor '.*' has dtype torch.int64 in the "
                                                       r"file, torch.float32 in the model$"):
        unipelt.load_adapter(tiny_model("bert"), tmp_path / "ints")
    unipelt.save_adapter(model, tmp_path / "meta")
    meta = tmp_path / "meta" / "unipelt_adapter.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_model": [1]}))
    with pytest.raises(unipelt.AdapterFileError, match=r"^load_adapter: base_model must be a mapping of the base's "
                                                       r"fields, got \[1\]$"):
        unipelt.load_adapter(tiny_model("bert"), tmp_path / "meta")


def test_a_method_no_memory_holds_is_one_line_and_changes_nothing():
    model = tiny_model("bert")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(unipelt.AttachError) as info:
        unipelt.attach(model, {"name": "big", "modules": [{"form": "bottleneck", "at": "ffn", "insertion": "parallel",
                                                            "compose": "add", "dim": 10**12}]})
    assert str(info.value).startswith("attach: method 'big' does not fit in memory (m0: dim=1000000000000")
    assert "\n" not in str(info.value)
    assert [n for n, _ in model.named_modules()] == names and not unipelt.is_attached(model)


def test_non_finite_adapter_tensors_are_neither_saved_nor_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    model = perturbed(unipelt.attach(tiny_model("bert"), "lora"))
    unipelt.save_adapter(model, tmp_path / "good")
    unipelt.export_peft(model, tmp_path / "peft")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.unipelt_m0_attn_q.form.up.weight[0, 0] = float("nan")
    for call in (unipelt.save_adapter, unipelt.export_peft):
        with pytest.raises(unipelt.AdapterFileError, match=r"^\w+: tensor '.*' \(nan\) holds non-finite values; "
                                                           r"nothing written$"):
            call(model, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
    for folder, name, call in ((tmp_path / "good", "adapter_model.safetensors", unipelt.load_adapter),
                               (tmp_path / "peft", "adapter_model.safetensors", unipelt.import_peft)):
        tensors = load_file(str(folder / name))
        first = sorted(tensors)[0]
        tensors[first][0] = float("inf")
        save_file(tensors, str(folder / name))
        fresh = tiny_model("bert")
        with pytest.raises(unipelt.AdapterFileError, match=rf"tensor '{first}' \(inf\) in .* holds non-finite values$"):
            call(fresh, folder)
        assert not unipelt.is_attached(fresh)
