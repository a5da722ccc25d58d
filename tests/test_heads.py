"""Which heads train: a newly initialised task head trains; a pretrained LM head (untied, as in Llama / Mistral /
Qwen2) stays frozen unless the method lists it in train_modules (PEFT's modules_to_save). Counted against PEFT
on the same tiny models."""

from __future__ import annotations

import pytest
import torch

import unipelt
from numerics import assert_same
from unipelt.attach import state_of
from tiny_models import tiny_model

peft = pytest.importorskip("peft")

LORA = {"name": "lora_qv", "modules": [{"form": "bottleneck", "at": ["attn.q", "attn.v"], "insertion": "parallel",
                                       "compose": "scale", "scale": 2.0, "dim": 8, "activation": "none",
                                       "init": "lora"}]}
PEFT_TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_trainable(family: str, **extra) -> int:
    model = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=8, lora_alpha=16,
                                                                  target_modules=PEFT_TARGETS[family], **extra))
    return _trainable(model)


def test_untied_lm_head_of_a_causal_lm_stays_frozen():
    model = tiny_model("llama")
    assert not model.config.tie_word_embeddings  # the case that matters: lm_head is its own pretrained matrix
    unipelt.attach(model, LORA)
    assert not model.lm_head.weight.requires_grad
    assert _trainable(model) == _peft_trainable("llama", task_type="CAUSAL_LM")
    assert unipelt.count_parameters(model)["head"] == 0


def test_listed_modules_train_like_peft_modules_to_save():
    model = tiny_model("llama")
    unipelt.attach(model, {**LORA, "train_modules": ["lm_head"]})
    assert model.lm_head.weight.requires_grad
    assert _trainable(model) == _peft_trainable("llama", task_type="CAUSAL_LM", modules_to_save=["lm_head"])
    # a base-model module can be listed too (a new vocabulary): the token embedding trains
    embedded = tiny_model("llama")
    unipelt.attach(embedded, {**LORA, "train_modules": ["embed_tokens"]})
    assert embedded.model.embed_tokens.weight.requires_grad and not embedded.lm_head.weight.requires_grad


def test_new_classification_head_trains_like_peft_seq_cls():
    model = tiny_model("bert")
    unipelt.attach(model, LORA)
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert _trainable(model) == _peft_trainable("bert", task_type="SEQ_CLS")


def test_unknown_train_module_is_refused_before_anything_changes():
    model = tiny_model("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(unipelt.AttachError, match="train_modules entry 'lm_heads'"):
        unipelt.attach(model, {**LORA, "train_modules": ["lm_heads"]})
    assert not unipelt.is_attached(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any("unipelt_" in n for n, _ in model.named_parameters())
    with pytest.raises(unipelt.MethodConfigError, match="train_modules"):
        unipelt.load_method({**LORA, "train_modules": [3]})


def test_train_modules_round_trip_through_the_spec_and_adapter_files(tmp_path):
    model = tiny_model("llama")
    unipelt.attach(model, {**LORA, "train_modules": ["lm_head"]})
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    unipelt.save_adapter(model, tmp_path)
    fresh = tiny_model("llama")
    unipelt.load_adapter(fresh, tmp_path)
    assert state_of(fresh).method.train_modules == ("lm_head",)
    assert_same(fresh.lm_head.weight.detach(), model.lm_head.weight.detach())  # saved and loaded as is
