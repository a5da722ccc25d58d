"""Parameter accounting as in He et al. (2022), Appendix B.

added: what the method adds, in the form that is saved and served (a prefix counts 2·l·d per attention module;
its reparameterisation MLP is a training aid, reported separately as `reparam`). trainable: what the
optimizer updates (adapters, the MLP, the task head, and base weights the method trains). percent: added
plus base weights the method trains (full, BitFit) over the base model's parameters; the task head is
reported as `head` and left out of the percentage, as in the papers.

Two ways to count, which the shared tests hold equal: an attached model is counted from its slots (what they
export, after AdaLoRA's pruning); a method on a model or a config is counted from its placements and each form's
formula (Form.count), without attaching anything. A budget is solved above this layer (unipelt.api).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import compat
from .attach import adapter_set, check_train_base, is_attached, prepare_counting, state_of, trained_parameters
from .forms import Counts, form_of
from .placement import resolve
from .quantize import element_count
from .spec import MethodSpec, load_method


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _summary(method: str, added: int, reparam: int, trainable: int, trained_base: int, head: int,
             base: int) -> dict[str, Any]:
    return {
        "method": method,
        "added": added,
        "reparam": reparam,
        "trained_base": trained_base,
        "head": head,
        "trainable": trainable,
        "base": base,
        "total": base + added,
        "percent": 100.0 * (added + trained_base) / base if base else 0.0,
    }


@compat.accepts_compiled
def attached_counts(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """Counts of an adapter attached to `model` (the only or the active one without a name), read from its slots.
    `trainable` is what that adapter trains (its modules, the base / head parameters it trains); on a model with
    one adapter, every parameter that requires a gradient."""
    aset = adapter_set(model)
    state = state_of(model, name, "count_parameters")
    # Counted as saved and served: a prefix's 2·l·d vectors per attention module (its MLP folded), AdaLoRA's kept
    # triplets (P, Λ, Q), a prompt's l vectors, plus scales and gates.
    added = sum(p.numel() for slot in state.slots.values() for p in slot.exported_parameters().values())
    reparam = sum(_count(r) for r in state.reparams.values())
    # A P-tuning prompt encoder is a training aid like the prefix MLP: reported as reparam, not added.
    reparam += sum(s.reparam_count() for s in state.slots.values())
    adapter_ids = {id(p) for s in aset.adapters.values() for m in [*s.slots.values(), *s.reparams.values()]
                   for p in m.parameters()}
    all_params = dict(model.named_parameters())
    trained_base = sum(all_params[n].numel() for n in state.trained_base)
    head = sum(all_params[n].numel() for n in state.trained_head)
    if len(aset.adapters) == 1:
        trainable = sum(p.numel() for p in all_params.values() if p.requires_grad)
    else:
        own = [p for m in [*state.slots.values(), *state.reparams.values()] for p in m.parameters()]
        trainable = sum(p.numel() for p in own) + trained_base + head
    base_model = getattr(model, "base_model", model)
    base = sum(element_count(p) for p in base_model.parameters() if id(p) not in adapter_ids)
    counts = _summary(state.method.name, added, reparam, trainable, trained_base, head, base)
    return {**counts, **_form_counts(state)}


def _form_counts(state) -> dict[str, int]:
    """What each form adds to the counts of an attached method (e.g. AdaLoRA's current total rank), summed over
    the modules of the method that declare the same entry."""
    extra: dict[str, int] = {}
    for module in state.method.modules:
        deltas = [s.delta_module for s in state.slots.values() if s.spec.name == module.name]
        for key, value in form_of(module.form).attached_counts(deltas).items():
            extra[key] = extra.get(key, 0) + value
    return extra


def placed_counts(model: nn.Module, method: Any) -> dict[str, Any]:
    """Counts of `method` on `model` from its placements and the forms' formulas; nothing is attached."""
    spec: MethodSpec = prepare_counting(model, load_method(method))
    placements = resolve(model, spec) if spec.modules else []
    counts = Counts()
    for module in spec.modules:
        counts += form_of(module.form).count(module, [p for p in placements if p.spec.name == module.name])
    check_train_base(model, spec)
    base_model = getattr(model, "base_model", model)
    base = sum(element_count(p) for p in base_model.parameters())
    params = dict(model.named_parameters())
    base_names, head_names = trained_parameters(model, spec)
    trained_base = sum(params[n].numel() for n in base_names)
    head = sum(params[n].numel() for n in head_names)
    return _summary(spec.name, counts.added, counts.reparam, counts.trainable + trained_base + head, trained_base,
                    head, base)


def build_meta_model(config: Any) -> nn.Module:
    """The bare architecture (no head) of a config, with no memory: parameters live on the meta device."""
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(str(config))
    with torch.device("meta"):
        return AutoModel.from_config(config)


@compat.accepts_compiled
def count_parameters(model_or_config: Any, method: Any = None, name: str | None = None) -> dict[str, Any]:
    """Counts for an attached model (one adapter: `name`, default the only or active one), or for a config
    (object, hub id or local dir) or a model plus a method whose sizes are given (unipelt.count_parameters solves
    a budget first)."""
    if isinstance(model_or_config, nn.Module):
        if method is None:
            return attached_counts(model_or_config, name)
        if is_attached(model_or_config):
            raise ValueError("count_parameters: the model already has a method attached; pass method=None")
        return placed_counts(model_or_config, method)
    if method is None:
        raise ValueError("count_parameters: a config needs a method (preset name, YAML path, dict or spec)")
    return placed_counts(build_meta_model(model_or_config), method)


__all__ = ["attached_counts", "build_meta_model", "count_parameters", "placed_counts"]
