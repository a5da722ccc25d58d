"""Every bad input gets one line that names the culprit, and a failed call leaves the model as it was.

Spec errors are raised through attach() on a real (tiny) model, so each case also checks that validation
happens before anything on the model changes.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig

import unipelt
from unipelt.sites.table import FAMILIES
from unipelt.forms import FORMS
from tiny_models import tiny_batch, tiny_model, unsupported_model

# ---- helpers ------------------------------------------------------------------------------------------------

ADAPTER = {"form": "bottleneck", "at": "ffn", "insertion": "parallel", "compose": "add", "dim": 4}
PREFIX = {"form": "prefix", "at": "attn.heads", "insertion": "parallel", "compose": "gate", "length": 2}
DROP = object()  # marks a key to remove from the base module


def method(base=ADAPTER, **changes) -> dict:
    """A one-module method: `base` with `changes` applied (DROP removes a key)."""
    module = {k: v for k, v in {**base, **changes}.items() if v is not DROP}
    return {"name": "bad", "modules": [module]}


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def inputs(family: str) -> dict:
    return {k: v for k, v in tiny_batch(family).items() if k != "labels"}


def logits(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(family)).logits


class Snapshot:
    """What attach could change: parameter names, values and trainability, modules, hooks, attention configs."""

    def __init__(self, model: nn.Module, family: str, forward: bool = True) -> None:
        self.family = family
        self.params = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
        self.modules = [n for n, _ in model.named_modules()]
        self.hooks = self._hooks(model)
        self.configs = [id(getattr(m, "config", None)) for m in model.modules()]
        self.logits = logits(model, family) if forward else None

    @staticmethod
    def _hooks(model: nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def assert_unchanged(self, model: nn.Module) -> None:
        assert not unipelt.is_attached(model)
        assert not any("unipelt_" in n for n, _ in model.named_parameters())
        assert [n for n, _ in model.named_modules()] == self.modules
        now = dict(model.named_parameters())
        assert now.keys() == self.params.keys()
        for name, (grad, value) in self.params.items():
            assert now[name].requires_grad == grad, name
            assert torch.equal(now[name], value), name
        assert self._hooks(model) == self.hooks
        assert [id(getattr(m, "config", None)) for m in model.modules()] == self.configs
        if self.logits is not None:
            assert torch.equal(logits(model, self.family), self.logits)


@pytest.fixture
def bert():
    model = tiny_model("bert")
    # Tiny models start fully trainable; a failed attach must not freeze anything.
    assert all(p.requires_grad for p in model.parameters())
    return model


def attach_fails(model, family, spec, error, match, forward: bool = True) -> str:
    """attach(model, spec) raises `error` matching `match`, in one line, and leaves the model untouched."""
    before = Snapshot(model, family, forward)
    with pytest.raises(error, match=match) as exc_info:
        unipelt.attach(model, spec)
    before.assert_unchanged(model)
    return one_line(exc_info)


# ---- method specs: names, files, keys, values, types, combinations -----------------------------------------

SPEC_CASES = [
    # (id, spec, match)
    ("unknown-top-key", {"name": "bad", "modules": [ADAPTER], "modulez": []}, r"method: unknown key 'modulez'"),
    ("unknown-module-key", method(dimm=8), r"module 0: unknown key 'dimm' for form 'bottleneck'"),
    ("missing-form", method(form=DROP), rf"module 0: missing key 'form' \(allowed: {re.escape(', '.join(FORMS))}\)"),
    ("missing-at", method(at=DROP), r"module 0: missing key 'at'"),
    ("missing-compose", method(compose=DROP), r"module 0: missing key 'compose'"),
    ("unknown-form", method(form="adaptor"), rf"form: unknown value 'adaptor' \(allowed: {re.escape(', '.join(FORMS))}\)"),
    ("unknown-insertion", method(insertion="serial"), r"insertion: unknown value 'serial' \(allowed: sequential"),
    ("unknown-compose", method(compose="multiply"), r"compose: unknown value 'multiply' \(allowed: add, scale"),
    ("unknown-activation", method(activation="swish"), r"activation: unknown value 'swish' \(allowed: relu"),
    ("unknown-init", method(init="xavier"), r"init: unknown value 'xavier' \(allowed: bert, lora"),
    ("unknown-layernorm", method(layernorm="both"), r"layernorm: unknown value 'both' \(allowed: none, in, out\)"),
    ("unknown-site", method(at=["ffn", "attn.qq"]), r"at: unknown value 'attn.qq' \(allowed: attn.q, "),
    ("unknown-stack", method(stacks="middle"), r"stacks: unknown value 'middle' \(allowed: encoder, decoder\)"),
    ("unknown-train-base", {"name": "bad", "modules": [ADAPTER], "train_base": "biases"},
     r"train_base: unknown value 'biases' \(allowed: none, all, bias, layernorm\)"),
    ("empty-at", method(at=[]), r"module 0: 'at' is empty"),
    ("dim-string", method(dim="8"), r"dim: expected a positive integer, got '8'"),
    ("dim-zero", method(dim=0), r"dim: expected a positive integer, got 0"),
    ("dim-bool", method(dim=True), r"dim: expected a positive integer, got True"),
    ("length-zero", method(PREFIX, length=0), r"length: expected a positive integer, got 0"),
    ("dropout-too-big", method(dropout=1.5), r"dropout: expected a number in \[0, 1\), got 1.5"),
    ("layers-string", method(layers="first"), r"layers must be 'all' or a non-empty list .*got 'first'"),
    ("layers-not-ints", method(layers=[0, "1"]), r"layers must hold integers, got '1'"),
    ("scale-string", method(compose="scale", scale="big"), r"scale must be a finite number or 'learned', got 'big'"),
    ("train-head-string", {"name": "bad", "modules": [ADAPTER], "train_head": "yes"},
     r"train_head: expected bool, got 'yes'"),
    ("bias-string", method(bias="no"), r"bias: expected bool, got 'no'"),
    ("name-not-identifier", method(name="my-adapter"), r"name 'my-adapter' must be a Python identifier"),
    ("modules-not-list", {"name": "bad", "modules": "lora"}, r"'modules' must be a list, got str"),
    ("module-not-mapping", {"name": "bad", "modules": ["lora"]}, r"module 0: expected a mapping"),
    # combinations that cannot work
    ("prefix-at-ffn", method(PREFIX, at="ffn"), r"form 'prefix' cannot act at 'ffn' \(allowed at: attn.heads"),
    ("prefix-sequential", method(PREFIX, insertion="sequential"),
     r"form 'prefix' cannot use insertion 'sequential' \(allowed insertion: parallel\)"),
    ("bottleneck-gate", method(compose="gate"), r"form 'bottleneck' cannot use compose 'gate'"),
    ("scale-with-add", method(scale=2.0), r"key 'scale' needs compose 'scale' \(got compose 'add'\)"),
    ("alpha-and-scale", method(compose="scale", scale=2.0, alpha=16),
     r"alpha sets the scale \(alpha / dim\): use it with compose 'scale' and without 'scale'"),
    ("alpha-with-add", method(alpha=16), r"alpha sets the scale \(alpha / dim\)"),
    ("alpha-with-reduction-factor", method(compose="scale", alpha=16, reduction_factor=16),
     r"alpha / dim needs one width; use dim, not reduction_factor"),
    ("alpha-not-positive", method(compose="scale", alpha=0), r"alpha"),
    ("input-std-without-mlp", method(PREFIX, input_std=1.0),
     r"input_std is the reparameterisation MLP's input; it needs mlp_dim"),
    ("prefix-key-on-bottleneck", method(length=4), r"unknown key 'length' for form 'bottleneck'"),
    ("duplicate-names", {"name": "bad", "modules": [dict(ADAPTER, name="a"), dict(ADAPTER, at="attn", name="a")]},
     r"module name 'a' is used twice"),
    ("no-modules", {"name": "bad", "modules": []}, r"method 'bad': no modules and train_base 'none'"),
    ("not-a-method", 42, r"expected a preset name, a YAML path, a dict or a DictConfig, got int"),
]


@pytest.mark.parametrize("spec, match", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_bad_spec(bert, spec, match):
    attach_fails(bert, "bert", spec, unipelt.MethodConfigError, match)


def test_unknown_preset_lists_the_presets(bert):
    message = attach_fails(bert, "bert", "lorra", unipelt.MethodConfigError, r"unknown method preset 'lorra'")
    allowed = message.split("allowed: ", 1)[1].rstrip(")").split(", ")
    assert allowed == unipelt.list_presets()


def test_missing_yaml_file(bert, tmp_path):
    path = tmp_path / "nowhere.yaml"
    attach_fails(bert, "bert", str(path), unipelt.MethodConfigError, rf"method file not found: .*nowhere\.yaml")


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\nmodules: [\n  {form: bottleneck\n", r"broken\.yaml: invalid YAML"),
        ("- form: bottleneck\n", r"broken\.yaml: expected a mapping at the top level"),
        ("", r"broken\.yaml: expected a mapping at the top level"),
        ("modules:\n  - {form: bottleneck, at: ffn, insertion: parallel, compose: add, dimm: 4}\n",
         r"method 'broken' module 0: unknown key 'dimm'"),  # the file name is the method's name
    ],
    ids=["invalid-yaml", "top-level-list", "empty-file", "bad-key-in-file"],
)
def test_bad_yaml_file(bert, tmp_path, text, match):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    attach_fails(bert, "bert", path, unipelt.MethodConfigError, match)


def test_dictconfig_is_validated_too(bert):
    from omegaconf import OmegaConf

    attach_fails(bert, "bert", OmegaConf.create(method(dim=0)), unipelt.MethodConfigError, r"dim: expected")


# ---- specs that are valid but do not fit the model ---------------------------------------------------------

MODEL_CASES = [
    # (id, family, spec, match)
    ("layer-out-of-range", "bert", method(layers=[0, 5]),
     r"layers: index 5 out of range for the encoder stack \(2 layers: 0\.\.1\)"),
    ("negative-layer", "bert", method(layers=[-1]), r"layers: index -1 out of range"),
    ("cross-attn-on-bert", "bert", method(at="cross_attn.q"), r"site 'cross_attn\.q' does not exist in this model"),
    ("gate-proj-on-bert", "bert", method(at="ffn.gate"), r"site 'ffn\.gate' does not exist in this model"),
    ("decoder-on-bert", "bert", method(stacks=["decoder"]), r"stacks \['decoder'\] not in this model"),
    ("gate-proj-on-t5-v1.0", "t5", method(at="ffn.gate"), r"module '.*DenseReluDense\.wi_0' not found"),
    ("bitfit-on-t5", "t5", "bitfit", r"train_base 'bias' but this t5 has no biases"),
    ("layer-out-of-range-bart-decoder", "bart", method(at="cross_attn.v", layers=[2]),
     r"index 2 out of range for the decoder stack"),
]


@pytest.mark.parametrize("family, spec, match", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_spec_does_not_fit_model(family, spec, match):
    model = tiny_model(family)
    message = attach_fails(model, family, spec, unipelt.AttachError, match)
    assert "method 'bad' module 0" in message or spec == "bitfit"  # names the module at fault


def test_unsupported_family_lists_supported_ones():
    model = unsupported_model()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(unipelt.AttachError, match=r"model type 'unknown_family' is not supported") as exc_info:
        unipelt.attach(model, "lora")
    supported = one_line(exc_info).split("(supported: ", 1)[1].split(")", 1)[0].split(", ")
    assert supported == sorted(FAMILIES)
    assert not unipelt.is_attached(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_not_a_model():
    with pytest.raises(unipelt.AttachError, match=r"expected a transformers PreTrainedModel, got Linear") as exc_info:
        unipelt.attach(nn.Linear(4, 4), "lora")
    one_line(exc_info)


def test_prefix_needs_eager_or_sdpa_attention():
    model = tiny_model("bert", attn="flex_attention")  # builds on CPU; only the prefix route refuses it
    # forward=False: flex attention compiles on its first CPU call (tens of seconds); the rest of the snapshot
    # (parameters, modules, hooks, attention configs) still shows the model was not touched.
    attach_fails(model, "bert", method(PREFIX), unipelt.AttachError,
                 r"prefix: attention implementation 'flex_attention' is not supported \(allowed: eager, sdpa\)",
                 forward=False)


# ---- state errors: attaching twice, operating on an untouched model ----------------------------------------

def test_attach_twice(bert):
    unipelt.attach(bert, "lora")
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    out = logits(bert, "bert")
    taken = r"an adapter named 'default' \(method 'lora'\) is already attached; pass another name="
    with pytest.raises(unipelt.AttachError, match=taken) as e:
        unipelt.attach(bert, "pa")
    one_line(e)
    # The first method is still the only one: no FFN adapter appeared, nothing else was frozen or thawed.
    assert not any("unipelt_m0_ffn" in n for n, _ in bert.named_parameters())
    assert {n for n, p in bert.named_parameters() if p.requires_grad} == trainable
    assert torch.equal(logits(bert, "bert"), out)


@pytest.mark.parametrize(
    "operation",
    [unipelt.detach, unipelt.merge, unipelt.fold_prefixes, lambda m: unipelt.save_adapter(m, "/tmp/never"),
     lambda m: unipelt.disabled(m).__enter__()],
    ids=["detach", "merge", "fold_prefixes", "save_adapter", "disabled"],
)
def test_untouched_model(bert, operation):
    before = Snapshot(bert, "bert")
    with pytest.raises(unipelt.AttachError, match=r"no unipelt method is attached to this BertForSequence") as e:
        operation(bert)
    one_line(e)
    before.assert_unchanged(bert)


# ---- load_adapter -------------------------------------------------------------------------------------------

WEIGHTS = "adapter_model.safetensors"
META = "unipelt_adapter.json"


@pytest.fixture
def saved(tmp_path):
    """A LoRA adapter (plus the classifier head) saved from a tiny BERT, with non-zero weights."""
    source = tiny_model("bert", seed=3)
    unipelt.attach(source, "lora")
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "unipelt_" in name:
                param.normal_(std=0.1)
    return unipelt.save_adapter(source, tmp_path / "adapter")


def load_fails(model, family, directory, match) -> str:
    before = Snapshot(model, family)
    with pytest.raises(unipelt.AdapterFileError, match=match) as exc_info:
        unipelt.load_adapter(model, directory)
    before.assert_unchanged(model)
    return one_line(exc_info)


def edit_tensors(directory, edit) -> None:
    tensors = load_file(str(directory / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS))


def edit_meta(directory, edit) -> None:
    meta = json.loads((directory / META).read_text())
    meta = edit(meta)
    (directory / META).write_text(json.dumps(meta))


def test_the_saved_adapter_loads(saved, bert):
    # The fixture itself is sound: the failures below come from the damage each test does.
    unipelt.load_adapter(bert, saved)
    assert unipelt.is_attached(bert)


def test_missing_directory(bert, tmp_path):
    load_fails(bert, "bert", tmp_path / "no_such_dir", r"no_such_dir/unipelt_adapter\.json not found")


def test_missing_weights_file(saved, bert):
    (saved / WEIGHTS).unlink()
    load_fails(bert, "bert", saved, r"adapter_model\.safetensors not found")


def test_corrupt_weights_file(saved, bert):
    (saved / WEIGHTS).write_bytes(b"\x00garbage, not a safetensors file" * 3)
    load_fails(bert, "bert", saved, r"adapter_model\.safetensors is corrupt or unreadable")


def test_truncated_weights_file(saved, bert):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    load_fails(bert, "bert", saved, r"adapter_model\.safetensors is corrupt or unreadable")


def test_missing_tensor(saved, bert):
    name = sorted(load_file(str(saved / WEIGHTS)))[0]
    edit_tensors(saved, lambda t: t.pop(name))
    load_fails(bert, "bert", saved, rf"1 tensors missing in .*, e\.g\. '{name}'")


def test_extra_tensor(saved, bert):
    edit_tensors(saved, lambda t: t.update({"bert.encoder.unipelt_bogus.weight": torch.zeros(2)}))
    load_fails(bert, "bert", saved, r"1 unexpected tensors in .*, e\.g\. 'bert\.encoder\.unipelt_bogus\.weight'")


def test_tensor_of_wrong_shape(saved, bert):
    name = next(n for n in sorted(load_file(str(saved / WEIGHTS))) if "unipelt_" in n)
    edit_tensors(saved, lambda t: t.update({name: torch.zeros(3, 3)}))
    load_fails(bert, "bert", saved, rf"tensor '{name}' has shape \(3, 3\) in the file")


def test_invalid_json(saved, bert):
    (saved / META).write_text("{not json")
    load_fails(bert, "bert", saved, r"unipelt_adapter\.json is not valid JSON")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: {k: v for k, v in m.items() if k != "method"}, r"unipelt_adapter\.json has no 'method' mapping"),
        (lambda m: [m], r"unipelt_adapter\.json has no 'method' mapping"),
        (lambda m: {**m, "format_version": 99}, r"format_version 99 in .*unipelt_adapter\.json"),
    ],
    ids=["no-method", "not-an-object", "future-format"],
)
def test_bad_metadata(saved, bert, edit, match):
    edit_meta(saved, edit)
    load_fails(bert, "bert", saved, match)


def test_invalid_method_in_file(saved, bert):
    def bad_dim(meta):
        meta["method"]["modules"][0]["dim"] = 0
        return meta

    edit_meta(saved, bad_dim)
    before = Snapshot(bert, "bert")
    with pytest.raises(unipelt.MethodConfigError, match=r"method 'lora' module 0: dim: expected") as e:
        unipelt.load_adapter(bert, saved)
    one_line(e)
    before.assert_unchanged(bert)


def test_different_hidden_size(saved):
    config = BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    load_fails(model, "bert", saved, r"saved for a different base model: hidden_size 32 there, 48 here")


def test_different_family(saved):
    load_fails(tiny_model("roberta"), "roberta", saved,
               r"saved for a different base model: model_type 'bert' there, 'roberta' here")


def test_different_head(saved):
    # Same encoder, but a 2-label head: the saved 3-label classifier does not fit, and the model is left alone.
    config = tiny_model("bert").config
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config).eval()
    load_fails(model, "bert", saved, r"tensor 'classifier\.(weight|bias)' has shape \(3")


def test_other_method_already_attached(saved, bert):
    unipelt.attach(bert, "pa")
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    differs = r"the attached method 'pa' \(adapter 'default'\) differs from the saved one 'lora'"
    with pytest.raises(unipelt.AdapterFileError, match=differs) as e:
        unipelt.load_adapter(bert, saved)
    one_line(e)
    assert unipelt.is_attached(bert)
    assert {n for n, p in bert.named_parameters() if p.requires_grad} == trainable


def test_failed_load_keeps_an_attached_prefix_mlp(tmp_path):
    # Loading onto a model that already carries a reparameterised prefix: a bad file must not fold the MLP away.
    spec = method(PREFIX, mlp_dim=8)
    source = tiny_model("bert")
    unipelt.attach(source, spec)
    directory = unipelt.save_adapter(source, tmp_path / "prefix")
    name = sorted(load_file(str(directory / WEIGHTS)))[0]
    edit_tensors(directory, lambda t: t.pop(name))

    target = tiny_model("bert", seed=5)
    unipelt.attach(target, spec)
    params_before = {n: p.detach().clone() for n, p in target.named_parameters()}
    out_before = logits(target, "bert")
    with pytest.raises(unipelt.AdapterFileError, match=r"1 tensors missing") as e:
        unipelt.load_adapter(target, directory)
    one_line(e)
    params_after = dict(target.named_parameters())
    assert params_after.keys() == params_before.keys()  # the MLP is still there, nothing was folded
    assert all(torch.equal(params_after[n], v) for n, v in params_before.items())
    assert unipelt.count_parameters(target)["reparam"] > 0
    assert torch.equal(logits(target, "bert"), out_before)
