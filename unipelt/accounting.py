"""Parameter accounting as in He et al. (2022), Appendix B.

added: what the method adds, in the form that is saved and served (a prefix counts 2·l·d per attention module;
its reparameterisation MLP is a training aid, reported separately as `reparam`). trainable: what the
optimizer updates (adapters, the MLP, the task head, and base weights the method trains). percent: added
plus base weights the method trains (full, BitFit) over the base model's parameters; the task head is
reported as `head` and left out of the percentage, as in the papers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attach import attach, detach, is_attached, state_of
from .prompting import PromptSlot
from .quantize import element_count


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _model_counts(model: nn.Module) -> dict[str, Any]:
    state = state_of(model)
    # Counted as saved and served: a prefix's 2·l·d vectors per attention module (its MLP folded), AdaLoRA's kept
    # triplets (P, Λ, Q), a prompt's l vectors, plus scales and gates.
    added = sum(p.numel() for slot in state.slots.values() for p in slot.exported_parameters().values())
    reparam = sum(_count(r) for r in state.reparams.values())
    # A P-tuning prompt encoder is a training aid like the prefix MLP: reported as reparam, not added.
    reparam += sum(s.reparam_count() for s in state.slots.values() if isinstance(s, PromptSlot))
    adapter_ids = {id(p) for s in state.slots.values() for p in s.parameters()}
    adapter_ids |= {id(p) for r in state.reparams.values() for p in r.parameters()}
    all_params = dict(model.named_parameters())
    trainable = sum(p.numel() for p in all_params.values() if p.requires_grad)
    trained_base = sum(all_params[n].numel() for n in state.trained_base)
    head = sum(all_params[n].numel() for n in state.trained_head)
    base_model = getattr(model, "base_model", model)
    base = sum(element_count(p) for p in base_model.parameters() if id(p) not in adapter_ids)
    return {
        "method": state.method.name,
        "added": added,
        "reparam": reparam,
        "trained_base": trained_base,
        "head": head,
        "trainable": trainable,
        "base": base,
        "total": base + added,
        "percent": 100.0 * (added + trained_base) / base if base else 0.0,
        **_svd_ranks(state),
    }


def _svd_ranks(state) -> dict[str, int]:
    """AdaLoRA: the current effective total rank over all svd slots (absent for methods without svd)."""
    forms = [s.form for s in state.slots.values() if hasattr(getattr(s, "form", None), "effective_rank")]
    return {"svd_rank": sum(f.effective_rank for f in forms)} if forms else {}


def build_meta_model(config: Any) -> nn.Module:
    """The bare architecture (no head) of a config, with no memory: parameters live on the meta device."""
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(str(config))
    with torch.device("meta"):
        return AutoModel.from_config(config)


def count_parameters(model_or_config: Any, method: Any = None) -> dict[str, Any]:
    """Counts for an attached model, or for a config (object, hub id or local dir) plus a method, built on meta."""
    if isinstance(model_or_config, nn.Module):
        if method is None:
            return _model_counts(model_or_config)
        if is_attached(model_or_config):
            raise ValueError("count_parameters: the model already has a method attached; pass method=None")
        attach(model_or_config, method)
        try:
            return _model_counts(model_or_config)
        finally:
            detach(model_or_config)
    if method is None:
        raise ValueError("count_parameters: a config needs a method (preset name, YAML path, dict or spec)")
    model = build_meta_model(model_or_config)
    with torch.device("meta"):  # build (and "initialise") the adapters on meta too: no memory, no init time
        attach(model, method)
    return _model_counts(model)
