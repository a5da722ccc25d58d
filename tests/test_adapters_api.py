"""The many-adapter API around the core: composition blocks as values (Python and YAML), trainability, folders of
adapters (unipelt's layout and PEFT's, both ways), and bad input: one line naming the culprit, nothing changed."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import unipelt
from numerics import assert_close_scaled, assert_same
from tiny_models import tiny_batch, tiny_model
from unipelt.attach import state_of
from unipelt.composition import block_from_config, block_to_config

SEQ_ADAPTER = {"name": "seq", "modules": [{"form": "bottleneck", "at": "ffn", "insertion": "sequential",
                                           "compose": "add", "dim": 4, "activation": "relu", "init": "bert"}]}


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def perturb_all(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


@pytest.fixture
def llama():
    model = tiny_model("llama")
    batch = tiny_batch("llama")
    batch.pop("labels")
    return model, batch


@pytest.fixture
def three(llama):
    """A tiny Llama with a LoRA 'a', a sequential bottleneck 'b' and a Houlsby adapter 'c', all off their init."""
    model, batch = llama
    base = copy.deepcopy(model)
    unipelt.attach(model, "lora", name="a")
    unipelt.attach(model, SEQ_ADAPTER, name="b")
    unipelt.attach(model, "houlsby", name="c")
    perturb_all(model)
    return model, batch, base


def fingerprint(model) -> tuple:
    """What an operation that fails must leave unchanged: every tensor, flag and the adapter registry."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    active = unipelt.active_adapters(model) if unipelt.is_attached(model) else None
    names = unipelt.list_adapters(model) if unipelt.is_attached(model) else None
    return tensors, flags, active, names, [n for n, _ in model.named_modules()]


def assert_unchanged(model, before: tuple) -> None:
    tensors, flags, active, names, modules = fingerprint(model)
    assert set(tensors) == set(before[0])
    for key, value in tensors.items():
        assert_same(value, before[0][key], key)
    assert flags == before[1] and active == before[2] and names == before[3] and modules == before[4]


def refused(model, call, match: str) -> None:
    before = fingerprint(model)
    with pytest.raises(unipelt.UnipeltError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    assert_unchanged(model, before)


def test_blocks_read_from_yaml_and_back():
    block = unipelt.Stack("a", unipelt.Parallel("b", "c"), unipelt.BatchSplit("d", unipelt.Stack("e", "f"),
                                                                              sizes=[1, 2]))
    data = block_to_config(block)
    assert data == {"stack": ["a", {"parallel": ["b", "c"]}, {"batch_split": ["d", {"stack": ["e", "f"]}],
                                                              "sizes": [1, 2]}]}
    assert block_from_config(json.loads(json.dumps(data))) == block
    assert block_from_config({"average": ["a", "b"], "weights": [0.25, 0.75]}) == \
        unipelt.Average("a", "b", weights=[0.25, 0.75])


def test_stack_order_matters_and_a_list_is_a_stack(three):
    model, batch, _ = three
    unipelt.set_active(model, ["b", "c"])
    listed = outputs(model, batch)
    unipelt.set_active(model, unipelt.Stack("b", "c"))
    assert_same(outputs(model, batch), listed)
    unipelt.set_active(model, unipelt.Stack("c", "b"))
    assert not torch.equal(outputs(model, batch), listed)  # sequential adapters at one site: the order is seen
    assert unipelt.active_adapters(model) == ["c", "b"]


def test_only_the_trainable_adapters_get_gradients(three):
    model, batch, _ = three
    unipelt.set_active(model, unipelt.Stack("a", "b", "c"), trainable="b")
    model(**batch).logits.pow(2).mean().backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert "unipelt_b__" in name, name
    assert any(p.grad is not None for n, p in model.named_parameters() if "unipelt_b__" in n)
    groups = unipelt.param_groups(model, 1e-3, name="b")
    assert all("unipelt_b__" in n for g in groups for n in g["names"])


def test_average_weights_the_deltas(three):
    """Average(a, b, weights) is h + w_a·Δ_a + w_b·Δ_b: with LoRAs on the same projection (Δ linear in x) that
    is the base with both ΔW folded in with those weights."""
    model, batch, base = three
    unipelt.attach(model, "lora", name="d")
    perturb_all(model, seed=4)  # every adapter moves again (d too)
    unipelt.set_active(model, unipelt.Average("a", "d", weights=[0.3, 0.9]))
    got = outputs(model, batch)
    reference = copy.deepcopy(base)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for adapter, weight in (("a", 0.3), ("d", 0.9)):
            for name, slot in state_of(model, adapter).slots.items():
                host = name.rpartition(".")[0]
                delta = slot.delta_module
                scale = slot.composer.fixed_factor()
                params[f"{host}.weight"] += weight * scale * (delta.up.weight @ delta.down.weight)
    assert_close_scaled(got, outputs(reference, batch), ops=8, reason="x(W + Σ w·s·BA) against xW + Σ w·s·B(Ax)")


def test_save_and_load_every_adapter_with_the_composition(three, tmp_path):
    model, batch, base = three
    unipelt.set_active(model, unipelt.Stack("a", unipelt.Parallel("b", "c")))
    expected = outputs(model, batch)
    unipelt.save_adapters(model, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "adapters.json", "b", "c"]
    loaded = copy.deepcopy(base)
    assert unipelt.load_adapters(loaded, tmp_path / "all") == ["a", "b", "c"]
    assert unipelt.active_adapters(loaded) == unipelt.active_adapters(model)
    assert_same(outputs(loaded, batch), expected)
    unipelt.save_adapters(model, tmp_path / "all")  # over a previous save: replaced whole
    assert unipelt.load_adapters(copy.deepcopy(base), tmp_path / "all") == ["a", "b", "c"]


def test_peft_multi_adapter_folders_both_ways(llama, tmp_path):
    from peft import PeftModel

    model, batch = llama
    base = copy.deepcopy(model)
    unipelt.attach(model, "lora")
    unipelt.attach(model, "lora", name="other")
    perturb_all(model)
    unipelt.save_adapters(model, tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    peft_model.load_adapter(str(tmp_path / "peft" / "other"), adapter_name="other")
    for name in ("default", "other"):
        unipelt.set_active(model, name)
        peft_model.set_adapter(name)
        assert_close_scaled(outputs(peft_model, batch), outputs(model, batch), ops=4,
                            reason="PEFT adds its LoRA output after the base projection; the sum rounds once more")
    # PEFT's own multi-adapter folder into unipelt
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    again = copy.deepcopy(base)
    assert unipelt.load_adapters(again, tmp_path / "from_peft") == ["default", "other"]
    unipelt.set_active(again, "other")
    unipelt.set_active(model, "other")
    assert_same(outputs(again, batch), outputs(model, batch))


def test_bad_names_and_blocks_change_nothing(three):
    model, _, _ = three
    refused(model, lambda: unipelt.set_active(model, "zzz"), r"set_active: no adapter named 'zzz'")
    refused(model, lambda: unipelt.set_active(model, unipelt.Stack("a", "a")), r"adapter 'a' appears twice")
    refused(model, lambda: unipelt.set_active(model, unipelt.Parallel("a", unipelt.Stack("b"))),
            r"Parallel: cannot hold a Stack")
    refused(model, lambda: unipelt.set_active(model, unipelt.BatchSplit("a", unipelt.BatchSplit("b", sizes=[1]),
                                                                         sizes=[1, 1])), r"BatchSplit: cannot hold")
    refused(model, lambda: unipelt.set_active(model, "a", trainable="b"), r"trainable adapter 'b' is not active")
    refused(model, lambda: unipelt.set_active(model, 3), r"expected an adapter name")
    refused(model, lambda: unipelt.attach(model, "lora", name="a"), r"an adapter named 'a' \(method 'lora'\)")
    for bad in ("x.y", "", "__x", "a__b", "1a", 3):
        refused(model, lambda bad=bad: unipelt.attach(model, "lora", name=bad), r"adapter name .* must start")
    refused(model, lambda: unipelt.rename_adapter(model, "a", "b"), r"an adapter named 'b' already exists")
    refused(model, lambda: unipelt.rename_adapter(model, "q", "r"), r"no adapter named 'q'")
    refused(model, lambda: unipelt.delete_adapter(model, "q"), r"delete_adapter: no adapter named 'q'")
    with unipelt.mixed_batch(model, ["a", None]):
        pass
    refused(model, lambda: unipelt.mixed_batch(model, ["a", "q"]).__enter__(), r"row 1 names adapter 'q'")
    refused(model, lambda: unipelt.attach(model, "qlora", name="q"), r"quantize 'nf4' but the base")
    refused(model, lambda: unipelt.attach(model, "full", name="f"), r"trains every base weight")


def test_deleted_and_foreign_adapters_are_unknown(three, llama):
    model, batch, _ = three
    unipelt.delete_adapter(model, "b")
    assert unipelt.list_adapters(model) == ["a", "c"]
    refused(model, lambda: unipelt.set_active(model, "b"), r"no adapter named 'b'")
    other = tiny_model("llama")
    unipelt.attach(other, "lora", name="elsewhere")
    refused(model, lambda: unipelt.set_active(model, unipelt.Parallel("a", "elsewhere")),
            r"no adapter named 'elsewhere'")


def test_ambiguous_calls_ask_for_a_name(three, tmp_path):
    model, _, _ = three
    unipelt.set_active(model, ["a", "b"])
    refused(model, lambda: unipelt.save_adapter(model, tmp_path / "x"), r"3 adapters .*2 of them active; pass name=")
    refused(model, lambda: unipelt.merge(model, name="c"), r"adapter 'c' is not active")


def test_a_merged_adapter_must_be_unmerged_before_switching(three):
    model, batch, _ = three
    unipelt.set_active(model, "a")
    expected = outputs(model, batch)
    unipelt.merge(model, name="a")
    refused(model, lambda: unipelt.set_active(model, "b"), r"adapter 'a' is merged into the weights")
    assert_close_scaled(outputs(model, batch), expected, ops=4, reason="W + sBA folded against xW + s·B(Ax)")
    unipelt.unmerge(model)
    unipelt.set_active(model, "b")


def test_two_prompts_cannot_both_act(llama):
    model, _ = llama
    unipelt.attach(model, "prompt_tuning", name="p")
    unipelt.attach(model, "prompt_tuning", name="q")
    refused(model, lambda: unipelt.set_active(model, ["p", "q"]), r"'p' and 'q' both insert virtual tokens")


def test_folders_refuse_what_is_not_theirs(three, tmp_path, llama):
    model, _, base = three
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(model, lambda: unipelt.save_adapters(model, foreign), r"holds other files")
    assert (foreign / "notes.txt").read_text() == "mine"
    refused(model, lambda: unipelt.save_adapters(model, foreign / "notes.txt"), r"is a file, not a folder")
    unipelt.save_adapters(model, tmp_path / "all")
    target = copy.deepcopy(base)
    unipelt.attach(target, "lora", name="b")
    refused(target, lambda: unipelt.load_adapters(target, tmp_path / "all"), r"already has an adapter named 'b'")
    (tmp_path / "all" / "c" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    fresh = copy.deepcopy(base)
    refused(fresh, lambda: unipelt.load_adapters(fresh, tmp_path / "all"), r"adapter 'c': .*corrupt or unreadable")
    manifest = tmp_path / "all" / "adapters.json"
    manifest.write_text(json.dumps({"format_version": 1, "adapters": ["a"], "active": {"stack": 3}}))
    refused(fresh, lambda: unipelt.load_adapters(fresh, tmp_path / "all"), r"stack takes a list")


def test_a_copied_model_keeps_its_own_adapters(three):
    model, batch, _ = three
    unipelt.set_active(model, "b")
    expected_b = outputs(model, batch)
    twin = copy.deepcopy(model)
    unipelt.set_active(twin, "c")
    assert unipelt.active_adapters(model) == "b"  # switching the copy leaves the original alone
    assert_same(outputs(model, batch), expected_b)
    unipelt.set_active(twin, "b")
    assert_same(outputs(twin, batch), expected_b)
    unipelt.delete_adapter(twin, "a")
    assert unipelt.list_adapters(model) == ["a", "b", "c"]


def test_an_error_inside_a_mixed_batch_restores_the_composition(three):
    model, batch, _ = three
    unipelt.set_active(model, ["a", "b"])
    expected = outputs(model, batch)
    with pytest.raises(RuntimeError, match="inside"):
        with unipelt.mixed_batch(model, ["c", None]):
            raise RuntimeError("inside")
    assert unipelt.active_adapters(model) == ["a", "b"]
    assert_same(outputs(model, batch), expected)


def test_batch_split_rows_must_match_the_batch(three):
    model, batch, _ = three
    unipelt.set_active(model, unipelt.BatchSplit("a", "b", sizes=[2, 1]))
    with pytest.raises(unipelt.AttachError, match=r"set_active: set for a batch of 3 rows, got 2 rows"):
        outputs(model, batch)
    with pytest.raises(unipelt.AttachError, match=r"Average: weight nan is not a finite number"):
        unipelt.Average("a", "b", weights=[float("nan"), 1.0])
    with pytest.raises(unipelt.AttachError, match=r"BatchSplit: size -1 is not a row count"):
        unipelt.BatchSplit("a", "b", sizes=[-1, 3])


def test_a_renamed_default_saves_the_same_file(llama, tmp_path):
    model, batch = llama
    base = copy.deepcopy(model)
    unipelt.attach(model, "lora")
    perturb_all(model)
    unipelt.save_adapter(model, tmp_path / "before")
    unipelt.rename_adapter(model, "default", "task")
    assert any("unipelt_task__" in n for n, _ in model.named_parameters())
    unipelt.save_adapter(model, tmp_path / "after", name="task")
    before = (tmp_path / "before" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "after" / "adapter_model.safetensors").read_bytes() == before
    fresh = copy.deepcopy(base)
    unipelt.load_adapter(fresh, tmp_path / "after")
    assert unipelt.list_adapters(fresh) == ["default"]
    assert_same(outputs(fresh, batch), outputs(model, batch))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_deleting_one_of_two_prefixes_keeps_the_other(family):
    """One prefix adapter installs the routing of an attention module for every prefix on it; deleting that adapter
    must not take the routing from the other one (whichever installed it)."""
    base = tiny_model(family)
    batch = tiny_batch(family)
    for deleted, kept in (("p1", "p2"), ("p2", "p1")):
        model, alone = copy.deepcopy(base), copy.deepcopy(base)
        for name, seed in (("p1", 3), ("p2", 4)):
            torch.manual_seed(seed)
            unipelt.attach(model, "prefix", name=name)
        torch.manual_seed({"p1": 3, "p2": 4}[kept])
        unipelt.attach(alone, "prefix")
        unipelt.delete_adapter(model, deleted)
        assert_same(outputs(model, batch), outputs(alone, batch))
        with unipelt.disabled(model):
            assert not torch.equal(outputs(model, batch), outputs(alone, batch))  # the prefix does act


def test_the_composition_cannot_change_inside_disabled(three):
    model, batch, _ = three
    with unipelt.disabled(model):
        refused(model, lambda: unipelt.set_active(model, "a"), r"set_active: called inside unipelt.disabled")
        refused(model, lambda: unipelt.attach(model, "lora", name="z"), r"attach: called inside unipelt.disabled")
        refused(model, lambda: unipelt.mixed_batch(model, ["a", "b"]).__enter__(), r"mixed_batch: called inside")
    assert unipelt.active_adapters(model) == "c"
