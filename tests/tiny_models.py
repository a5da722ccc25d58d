"""Tiny random models of each supported family, built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    BertForSequenceClassification,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
    T5Config,
)

VOCAB = 101


def _config(family: str, attn: str):
    common = dict(vocab_size=VOCAB)
    if family == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=64, num_labels=3, **common)
    if family == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=70, num_labels=2, pad_token_id=1, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, max_position_embeddings=64, **common)
    if family == "bart":
        return BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, forced_eos_token_id=None, **common)
    if family == "t5":
        return T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, **common)
    if family == "gemma":
        return GemmaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, intermediate_size=48, max_position_embeddings=64, **common)
    raise ValueError(family)


FAMILIES = ("bert", "roberta", "gpt2", "llama", "gemma", "bart", "t5")
AUTO = {"bert": AutoModelForSequenceClassification, "roberta": AutoModelForSequenceClassification,
        "gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM, "gemma": AutoModelForCausalLM,
        "bart": AutoModelForSeq2SeqLM, "t5": AutoModelForSeq2SeqLM}

DECODERS = tuple(f for f in FAMILIES if AUTO[f] is AutoModelForCausalLM)
ENCODER_DECODERS = tuple(f for f in FAMILIES if AUTO[f] is AutoModelForSeq2SeqLM)


class UnknownFamilyConfig(BertConfig):
    """A BERT body under a model type that no row of the site table maps."""

    model_type = "unknown_family"


def unsupported_model():
    """What "unsupported" means in tests: a model whose type the site table does not know. Not a real family, so
    that adding one (a row of unipelt/sites/table.py) never turns a test of the refusal into a test of nothing."""
    torch.manual_seed(0)
    config = UnknownFamilyConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


def has_biases(family: str) -> bool:
    """Whether the family's base model has bias parameters (BitFit needs them; T5, Llama and Gemma have none)."""
    return any(name.endswith("bias") for name, _ in tiny_model(family).base_model.named_parameters())


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa", **config_changes):
    """A tiny random model of `family` (config fields overridden by `config_changes`), in eval mode."""
    torch.manual_seed(seed)
    config = _config(family, attn)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AUTO[family].from_config(config, attn_implementation=attn)
    return model.eval()


def tiny_batch(family: str, batch: int = 2, length: int = 7, seed: int = 1, padded: bool = True) -> dict:
    """Inputs with real padding on the second example (right padding, the tokenizers' default)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded and batch > 1:
        mask[1, length - 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family in ENCODER_DECODERS:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    if family in ("bert", "roberta"):
        inputs["labels"] = torch.tensor([0, 1][:batch] + [0] * max(0, batch - 2))
    elif family in ENCODER_DECODERS:
        inputs["labels"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    else:
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


def perturb_adapters(model, seed: int = 3, scale: float = 0.1):
    """Move every adapter parameter off its init (often zero), so that tests compare non-trivial adapters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_" in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def perturb_adapter(model, name: str, seed: int) -> None:
    """Move one named adapter's parameters, and its copies of head / base parameters, off their init (the adapter
    is the active one: its copies are in the model)."""
    import unipelt

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in unipelt.param_groups(model, 1e-2, name=name):
            for param in group["params"]:
                if param.dtype.is_floating_point:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
