"""Which base and head parameters a method trains besides its own modules: train_base (all, bias, layernorm),
train_modules, and a newly initialised task head (a pretrained LM head stays frozen)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import AttachError


def check_train_base(model: nn.Module, spec: Any) -> None:
    base = getattr(model, "base_model", model)
    if spec.train_base == "bias" and not any(n.endswith("bias") for n, _ in base.named_parameters()):
        raise AttachError(f"method '{spec.name}': train_base 'bias' but this {model.config.model_type} has no biases")


def _pretrained_head_ids(model: nn.Module) -> set[int]:
    """Parameters of a pretrained LM head outside the base model (an untied lm_head, BERT's MLM head): a model with
    output embeddings is a language model whose head came with its weights. Any other head (classifier, score,
    tagger, QA span head) is newly initialised for the task."""
    get = getattr(model, "get_output_embeddings", None)
    if get is None or get() is None:
        return set()
    return {id(p) for p in model.parameters()}


def _listed_module_ids(model: nn.Module, spec: Any) -> set[int]:
    """Parameters of the modules the method names in train_modules (a name or a '.'-separated name suffix)."""
    ids: set[int] = set()
    modules = list(model.named_modules())
    for entry in spec.train_modules:
        found = [m for name, m in modules if name == entry or name.endswith(f".{entry}")]
        if not found:
            raise AttachError(f"method '{spec.name}': train_modules entry '{entry}' matches no module of this "
                              f"{type(model).__name__}")
        ids |= {id(p) for m in found for p in m.parameters()}
    return ids


def _norm_ids(model: nn.Module) -> set[int]:
    """Parameters of the normalisation layers (LayerNorm, RMSNorm and the families' own classes of them)."""
    names = ("LayerNorm", "RMSNorm")
    return {id(p) for m in model.modules() if any(n in type(m).__name__ for n in names) for p in m.parameters()}


def trained_parameters(model: nn.Module, spec: Any) -> tuple[list[str], list[str]]:
    """Names of the base parameters and of the head parameters (outside base_model) that the method trains besides
    its own modules: train_base (all, bias, layernorm), train_modules, and a newly initialised task head."""
    base = getattr(model, "base_model", model)
    base_ids = {id(p) for p in base.parameters()}
    norms = _norm_ids(base) if spec.train_base == "layernorm" else set()
    pretrained_head = _pretrained_head_ids(model) - base_ids
    listed = _listed_module_ids(model, spec)
    trained_base, trained_head = [], []
    for name, param in model.named_parameters():
        if ".unipelt_" in f".{name}" or not param.dtype.is_floating_point:  # adapters; a quantized base weight
            continue
        in_base = id(param) in base_ids
        if spec.train_base == "all" or id(param) in listed:
            train = True
        elif in_base:
            train = (spec.train_base == "bias" and name.endswith("bias")) or id(param) in norms
        else:
            train = spec.train_head and id(param) not in pretrained_head
        if train:
            (trained_base if in_base else trained_head).append(name)
    return trained_base, trained_head


__all__ = ["check_train_base", "trained_parameters"]
