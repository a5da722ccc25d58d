"""An adapter file identifies its base by the whole model config minus training-time keys: a field no hand-kept
list named (Gemma's rms_norm_eps) is checked, and how a model was loaded or will be trained (dropout, labels,
cache, outputs) is not."""

from __future__ import annotations

import pytest
import torch

import unipelt
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
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trained(**batch).logits, rtol=0, atol=1e-6)
