"""More bad input for the core: budgets, PEFT interop, adapter identity. One line naming the culprit, and nothing
modified or written. (The helpers and the first ~80 cases live in test_bad_input.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

import unipelt
from test_bad_input import Snapshot, attach_fails, logits, method
from unipelt.attach import state_of
from tiny_models import tiny_model, unsupported_model

LORA = {"form": "bottleneck", "at": ["attn.q", "attn.v"], "insertion": "parallel", "compose": "scale", "scale": 2.0,
        "dim": 4, "activation": "none", "init": "lora"}


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def bert():
    return tiny_model("bert")


# ---- budgets ------------------------------------------------------------------------------------------------

BUDGET_CASES = [
    ("budget-word", "half", r"budget: expected a percentage of the base model like '0\.5%' or a positive parameter "
                            r"count, got 'half'"),
    ("budget-zero", 0, r"budget: expected a percentage .* got 0$"),
    ("budget-zero-percent", "0%", r"budget: expected a percentage .* got '0%'"),
    ("budget-over-100-percent", "150%", r"budget: expected a percentage .* got '150%'"),
    ("budget-bool", True, r"budget: expected a percentage .* got True"),
    ("budget-too-small", 10, r"method 'bad': budget 10 \(10 added parameters\) cannot be met; reachable: 256 "
                             r"\(m0\.dim=1\) to 8,192 \(m0\.dim=32\)"),
    ("budget-too-large", "90%", r"budget '90%' \(.* added parameters\) cannot be met; reachable: 256 .* to 8,192"),
]


@pytest.mark.parametrize("budget, match", [c[1:] for c in BUDGET_CASES], ids=[c[0] for c in BUDGET_CASES])
def test_bad_budget(bert, budget, match):
    attach_fails(bert, "bert", {**method(LORA), "budget": budget}, unipelt.MethodConfigError, match)


@pytest.mark.parametrize("preset", ["full", "bitfit"])
def test_budget_without_a_sized_module(bert, preset):
    spec = {**unipelt.load_method(preset).to_dict(), "budget": "0.5%"}
    attach_fails(bert, "bert", spec, unipelt.MethodConfigError,
                 rf"method '{preset}': budget '0\.5%' needs a module with a size to solve; this method has none")


def test_budget_on_sizes_a_template_pins(bert):
    # P-tuning's prompt length is fixed by its template's virtual tokens: there is nothing to solve.
    spec = {**unipelt.load_method("p_tuning").to_dict(), "budget": "0.5%"}
    attach_fails(bert, "bert", spec, unipelt.MethodConfigError,
                 r"method 'p_tuning': budget '0\.5%' cannot resize its modules \(method 'p_tuning' module 0: template")


# ---- export_peft: what PEFT's LoRA cannot express, refused before anything is written -----------------------

EXPORT_CASES = [
    ("prefix", method({"form": "prefix", "at": "attn.heads", "insertion": "parallel", "compose": "gate", "length": 2}),
     r"module 'm0' at 'attn\.heads' cannot be expressed as PEFT LoRA: form 'prefix'"),
    ("sequential", method({"form": "bottleneck", "at": ["attn", "ffn"], "insertion": "sequential", "compose": "add"}),
     r"module 'm0' at 'attn' cannot be expressed as PEFT LoRA: insertion 'sequential' "
     r"\(PEFT LoRA needs insertion 'parallel'\)"),
    ("activation", "pa", r"activation 'relu' \(PEFT LoRA needs activation 'none'\)"),
    ("sigmoid-gate", method({**{k: v for k, v in LORA.items() if k != "scale"}, "compose": "sigmoid_gate"}),
     r"compose 'sigmoid_gate' \(PEFT LoRA needs add or scale\)"),
    ("sublayer-site", method({**LORA, "at": "ffn"}), r"site 'ffn' \(PEFT LoRA acts on projections: attn\.q"),
    ("bias", method({**LORA, "bias": True}), r"bias: true \(PEFT LoRA has no bias in A and B\)"),
    ("two-dropouts", {"name": "bad", "modules": [{**LORA, "name": "a", "dropout": 0.1},
                                                 {**LORA, "name": "b", "at": "ffn.up", "dropout": 0.2}]},
     r"modules use different dropouts \[0\.1, 0\.2\]; PEFT LoRA has one lora_dropout"),
    ("train-base", {"name": "bad", "modules": [LORA], "train_base": "bias"},
     r"train_base 'bias' has no PEFT LoRA equivalent"),
]


@pytest.mark.parametrize("spec, match", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_export_peft_refuses(bert, tmp_path, spec, match):
    unipelt.attach(bert, spec)
    with pytest.raises(unipelt.AdapterFileError, match=match) as exc_info:
        unipelt.export_peft(bert, tmp_path / "out")
    assert one_line(exc_info).startswith("export_peft: ")
    assert not (tmp_path / "out").exists()


def test_export_peft_of_merged_modules(bert, tmp_path):
    unipelt.attach(bert, "lora")
    unipelt.merge(bert)
    with pytest.raises(unipelt.AdapterFileError, match=r"export_peft: modules are merged .* unipelt\.unmerge") as e:
        unipelt.export_peft(bert, tmp_path / "out")
    one_line(e)
    assert not (tmp_path / "out").exists()


def test_export_peft_of_an_untouched_model(bert, tmp_path):
    with pytest.raises(unipelt.AttachError, match=r"no unipelt method is attached") as e:
        unipelt.export_peft(bert, tmp_path / "out")
    one_line(e)
    assert not (tmp_path / "out").exists()


# ---- import_peft: PEFT files unipelt cannot reproduce exactly, or that do not fit ----------------------------

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture
def peft_dir(tmp_path):
    """A valid PEFT LoRA adapter (written by export_peft, no peft needed) for the tiny BERT."""
    source = tiny_model("bert", seed=3)
    unipelt.attach(source, method(LORA))
    return unipelt.export_peft(source, tmp_path / "peft")


def edit_config(directory, **changes) -> None:
    config = json.loads((directory / PEFT_CONFIG).read_text())
    (directory / PEFT_CONFIG).write_text(json.dumps({**config, **changes}))


def edit_weights(directory, edit) -> None:
    tensors = load_file(str(directory / PEFT_WEIGHTS))
    edit(tensors)
    save_file(tensors, str(directory / PEFT_WEIGHTS))


def import_fails(model, directory, error, match) -> str:
    before = Snapshot(model, "bert")
    with pytest.raises(error, match=rf"import_peft: {match}") as exc_info:
        unipelt.import_peft(model, directory)
    before.assert_unchanged(model)
    return one_line(exc_info)


def test_the_exported_peft_adapter_imports(peft_dir, bert):
    unipelt.import_peft(bert, peft_dir)  # the damage below is what makes each case fail
    assert unipelt.is_attached(bert)


CONFIG_CASES = [
    ("peft-type-ia3", {"peft_type": "IA3"}, r"peft_type 'IA3' is not supported \(allowed: LORA\)"),
    ("qalora", {"use_qalora": True}, r"use_qalora=True has no exact unipelt equivalent \(supported: use_qalora=False\)"),
    ("lora-bias", {"lora_bias": True}, r"lora_bias=True has no exact unipelt equivalent"),
    ("bias-all", {"bias": "all"}, r"bias='all' has no exact unipelt equivalent \(supported: bias='none'\)"),
    ("layer-replication", {"layer_replication": [[0, 2]]}, r"layer_replication=\[\[0, 2\]\] has no exact unipelt"),
    ("all-linear", {"target_modules": "all-linear"}, r"target_modules 'all-linear' is not supported"),
    ("no-target", {"target_modules": ["nonexistent"]}, r"target_modules \['nonexistent'\] match no module here"),
    ("variant-init", {"init_lora_weights": "mica"}, r"init_lora_weights='mica' selects a LoRA variant"),
    ("arrow", {"arrow_config": {"top_k": 2}}, r"arrow_config=\{'top_k': 2\} has no exact unipelt equivalent"),
    ("head-not-here", {"modules_to_save": ["score"]}, r"modules_to_save 'score' matches no module here"),
    ("pooler-target", {"target_modules": ["query", "pooler.dense"]},
     r"target module 'bert\.pooler\.dense' \(Linear\) is not a projection site unipelt can modify"),
    ("embedding-target", {"target_modules": ["word_embeddings"]},
     r"target module 'bert\.embeddings\.word_embeddings' \(Embedding\) is not a projection site"),
]


@pytest.mark.parametrize("changes, match", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_import_peft_refuses_config(peft_dir, bert, changes, match):
    edit_config(peft_dir, **changes)
    import_fails(bert, peft_dir, unipelt.AdapterFileError, match)


KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop(KEY), rf"tensor '{KEY}' missing in adapter_model\.safetensors"),
        (lambda t: t.update({KEY: torch.zeros(32, 5)}),
         rf"tensor '{KEY}' has shape \(32, 5\) in the file, \(32, 4\) for r=4"),
        (lambda t: t.update({"base_model.model.bert.pooler.dense.weight": torch.zeros(32, 32)}),
         r"unexpected tensor 'base_model\.model\.bert\.pooler\.dense\.weight' \(not a LoRA weight"),
        (lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(2, 32)}),
         r"tensor 'base_model\.model\.classifier\.weight' has shape \(2, 32\) in the file, \(3, 32\) in the model"),
        (lambda t: t.pop("base_model.model.classifier.bias"),
         r"tensor 'base_model\.model\.classifier\.bias' of modules_to_save 'classifier' missing in adapter_model"),
    ],
    ids=["missing-tensor", "wrong-rank", "extra-tensor", "wrong-head-shape", "missing-head-tensor"],
)
def test_import_peft_refuses_weights(peft_dir, bert, edit, match):
    edit_weights(peft_dir, edit)
    import_fails(bert, peft_dir, unipelt.AdapterFileError, match)


def test_import_peft_corrupt_weights(peft_dir, bert):
    (peft_dir / PEFT_WEIGHTS).write_bytes(b"\x00not safetensors" * 4)
    import_fails(bert, peft_dir, unipelt.AdapterFileError, r".*adapter_model\.safetensors is corrupt or unreadable")


def test_import_peft_missing_config(peft_dir, bert):
    (peft_dir / PEFT_CONFIG).unlink()
    import_fails(bert, peft_dir, unipelt.AdapterFileError, r".*adapter_config\.json not found")


def test_import_peft_invalid_json(peft_dir, bert):
    (peft_dir / PEFT_CONFIG).write_text("{r: 4")
    import_fails(bert, peft_dir, unipelt.AdapterFileError, r".*adapter_config\.json is not valid JSON")


def test_import_peft_onto_an_attached_model(peft_dir, bert):
    unipelt.attach(bert, "pa")
    out = logits(bert, "bert")
    taken = r"import_peft: an adapter named 'default' \(method 'pa'\) is already attached"
    with pytest.raises(unipelt.AttachError, match=taken) as e:
        unipelt.import_peft(bert, peft_dir)
    one_line(e)
    assert state_of(bert).method.name == "pa"
    assert torch.equal(logits(bert, "bert"), out)


def test_import_peft_unsupported_family(peft_dir):
    model = unsupported_model()
    with pytest.raises(unipelt.AttachError, match=r"model type 'unknown_family' is not supported \(supported: ") as e:
        unipelt.import_peft(model, peft_dir)
    one_line(e)
    assert not unipelt.is_attached(model)


# ---- unipelt adapter files: base identity with a config hash -------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    source = tiny_model("bert", seed=3)
    unipelt.attach(source, "lora")
    return unipelt.save_adapter(source, tmp_path / "adapter")


def test_adapter_file_carries_identity(saved):
    meta = json.loads((saved / "unipelt_adapter.json").read_text())
    assert meta["format_version"] == 1 and meta["method"]["name"] == "lora"
    identity = meta["base_model"]
    assert identity["model_type"] == "bert" and "name_or_path" in identity
    assert len(identity["config_hash"]) == 16
    assert identity["config_hash"] == unipelt.io.config_hash(tiny_model("bert").config)  # stable across instances


def _bert_with(**changes):
    config = tiny_model("bert").config
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_load_onto_a_base_that_differs_outside_the_main_fields(saved):
    model = _bert_with(hidden_act="relu")
    before = Snapshot(model, "bert")
    with pytest.raises(unipelt.AdapterFileError,
                       match=r"saved for a different base model: hidden_act 'gelu' there, 'relu' here") as e:
        unipelt.load_adapter(model, saved)
    one_line(e)
    before.assert_unchanged(model)


def test_load_checks_the_config_hash(saved):
    # A file whose identity holds only the hash (no field list) is still refused on a different base, by hash.
    meta = json.loads((saved / "unipelt_adapter.json").read_text())
    del meta["base_model"]["architecture"]
    (saved / "unipelt_adapter.json").write_text(json.dumps(meta))
    model = _bert_with(max_position_embeddings=128)
    before = Snapshot(model, "bert")
    with pytest.raises(unipelt.AdapterFileError,
                       match=r"different base model: config_hash '[0-9a-f]{16}' there, '[0-9a-f]{16}' here") as e:
        unipelt.load_adapter(model, saved)
    one_line(e)
    before.assert_unchanged(model)


@pytest.mark.parametrize("load", ["load_adapter", "import_peft"])
def test_values_that_overflow_a_half_precision_model_are_refused(tmp_path, load):
    """A float32 file whose values exceed float16's range: the finite check runs on the values as the model would
    hold them, so nothing turns into inf in silence."""
    source = tiny_model("llama")
    unipelt.attach(source, "lora")
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "unipelt_" in name:
                param.fill_(1e6)
    unipelt.save_adapter(source, tmp_path / "unipelt")
    unipelt.export_peft(source, tmp_path / "peft")
    half = tiny_model("llama").half()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    with pytest.raises(unipelt.AdapterFileError, match=rf"{load}: tensor .* overflows torch.float16") as e:
        getattr(unipelt, load)(half, tmp_path / ("unipelt" if load == "load_adapter" else "peft"))
    one_line(e)
    assert not unipelt.is_attached(half)
    assert all(torch.equal(v, before[k]) for k, v in half.state_dict().items())
