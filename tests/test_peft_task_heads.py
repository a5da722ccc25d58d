"""PEFT's most common file: a LoRA saved with task_type="SEQ_CLS" lists modules_to_save ['classifier', 'score'] (every
head name its task type may use). import_peft loads the head the model has, ignores the other name, and gives
PEFT's own outputs (issue 12, item 7)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

import unipelt
from numerics import assert_close_scaled
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

peft = pytest.importorskip("peft")


def tiny_llama_classifier(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_seq_cls_lora_imports_the_head_the_model_has(tmp_path, family):
    build = (lambda: tiny_model("bert")) if family == "bert" else tiny_llama_classifier
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                              target_modules=["query", "value", "q_proj", "v_proj"],
                                                              init_lora_weights=False))
    with torch.no_grad():  # a trained head differs from the fresh one the importing model has
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(tmp_path)
    batch = {k: v for k, v in tiny_batch("llama" if family == "llama" else "bert").items() if k != "labels"}
    if family == "llama":
        batch["input_ids"] = batch["input_ids"].clamp(min=1)  # the pad id marks the last token for Llama's head
        batch.pop("token_type_ids", None)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    model = unipelt.import_peft(build(), tmp_path)
    with torch.no_grad():
        assert_close_scaled(model(**batch).logits, expected, ops=len(state_of(model).slots),
                            reason="PEFT's W·x + (alpha / r)·B(A·x) against ours at each adapted projection")
    head = "classifier" if family == "bert" else "score"
    assert any(name.startswith(head) for name in state_of(model).trained_head)


def test_a_task_head_named_in_the_file_with_tensors_but_absent_here_is_still_refused(tmp_path):
    """Only names PEFT adds by itself, with nothing of theirs in the file, are skipped."""
    peft_model = peft.get_peft_model(tiny_llama_classifier(), peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                                               target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    model = tiny_model("bert")  # a BERT has a classifier, not the file's 'score' tensors, and other projections
    with pytest.raises(unipelt.AdapterFileError, match="match no module here|matches no module here"):
        unipelt.import_peft(model, tmp_path)
    assert not unipelt.is_attached(model)


@pytest.mark.parametrize("change, message", [
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": 2.5}, "r must be a positive integer, got 2.5"),
    ({"r": "2"}, "r must be a positive integer, got '2'"),
    ({"lora_alpha": "16"}, "lora_alpha must be a finite number, got '16'"),
    ({"rank_pattern": {"query": "x"}}, "rank_pattern['query'] must be a positive integer, got 'x'"),
    ({"alpha_pattern": {"query": float("inf")}}, "alpha_pattern['query'] must be a finite number, got inf"),
    ({"layers_to_transform": "0"}, "layers_to_transform must be a layer index or a list of them, got '0'"),
])
def test_hand_edited_peft_configs_are_refused_in_one_line(tmp_path, change, message):
    """r=0 divided by zero, r=2.5 was cut to 2, a string alpha or rank crashed (found by attacking the reader)."""
    import json

    peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    model = tiny_model("bert")
    with pytest.raises(unipelt.AdapterFileError) as info:
        unipelt.import_peft(model, tmp_path)
    assert str(info.value) == f"import_peft: {message}"
    assert not unipelt.is_attached(model)


def test_modules_to_save_as_one_string_is_one_name(tmp_path):
    import json

    peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=2, target_modules=["query"],
                                                            modules_to_save=["classifier"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "modules_to_save": "classifier"}))
    model = unipelt.import_peft(tiny_model("bert"), tmp_path)
    assert state_of(model).trained_head == ["classifier.weight", "classifier.bias"]
