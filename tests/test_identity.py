"""An adapter file identifies its base by the whole model config minus training-time keys: a field no hand-kept
list named (Gemma's rms_norm_eps) is checked, and how a model was loaded or will be trained (dropout, labels,
cache, outputs) is not."""

from __future__ import annotations

import pytest
import torch

import unipelt
from numerics import assert_same
from tiny_models import perturb_adapters, tiny_batch, tiny_model


@pytest.fixture
def saved(tmp_path):
    model = perturb_adapters(unipelt.attach(tiny_model("gemma"), "lora"))
    return unipelt.save_adapter(model, tmp_path / "adapter"), model


def test_a_field_of_a_new_family_is_part_of_the_identity(saved):
    directory, _ = saved
    model = tiny_model("gemma", rms_norm_eps=1e-3)
    with pytest.raises(unipelt.AdapterFileError,
                       match=r"saved for a different base model: rms_norm_eps 1e-06 there, 0\.001 here"):
        unipelt.load_adapter(model, directory)
    assert not unipelt.is_attached(model)


def test_training_time_settings_are_not_part_of_the_identity(saved):
    directory, trained = saved
    batch = tiny_batch("gemma")
    model = tiny_model("gemma")
    for key, value in dict(attention_dropout=0.1, use_cache=False, output_hidden_states=True,
                           id2label={0: "a", 1: "b"}).items():
        setattr(model.config, key, value)
    unipelt.load_adapter(model, directory)
    with torch.no_grad():  # in eval mode none of these settings changes an operation: the same outputs, bit for bit
        assert_same(model(**batch).logits, trained(**batch).logits)


def _as_older_unipelt_wrote_it(directory, **field_changes) -> None:
    """The identity layout of files saved before the whole config was recorded (same format_version 1): shape
    fields at the top, an architecture dict of selected fields, and a hash by another rule."""
    import json

    path = directory / "unipelt_adapter.json"
    meta = json.loads(path.read_text())
    arch = meta["base_model"]["architecture"]
    top = {k: arch[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "intermediate_size", "vocab_size")}
    meta["base_model"] = {"model_type": meta["base_model"]["model_type"], **top, "name_or_path": "",
                          "architecture": {k: arch[k] for k in ("head_dim", "hidden_act", "rms_norm_eps")},
                          "config_hash": "0123456789abcdef"}
    meta["base_model"].update(field_changes)
    path.write_text(json.dumps(meta))


def test_an_adapter_in_the_older_identity_layout_loads_onto_its_base(saved):
    """Adapters saved before 2026-12 recorded selected fields; every field they list is checked (by name), their
    hash (another rule) is not compared, and the outputs are the saved model's."""
    directory, trained = saved
    written = (directory / "unipelt_adapter.json").read_text()
    _as_older_unipelt_wrote_it(directory)
    model = unipelt.load_adapter(tiny_model("gemma"), directory)
    batch = tiny_batch("gemma")
    with torch.no_grad():
        assert_same(model(**batch).logits, trained(**batch).logits)
    other = tiny_model("gemma", rms_norm_eps=1e-3)
    with pytest.raises(unipelt.AdapterFileError,
                       match=r"saved for a different base model: rms_norm_eps 1e-06 there, 0\.001 here"):
        unipelt.load_adapter(other, directory)
    (directory / "unipelt_adapter.json").write_text(written)
    _as_older_unipelt_wrote_it(directory, hidden_size=64)
    with pytest.raises(unipelt.AdapterFileError, match=r"different base model: hidden_size 64 there, \d+ here"):
        unipelt.load_adapter(tiny_model("gemma"), directory)
    assert not unipelt.is_attached(other)
