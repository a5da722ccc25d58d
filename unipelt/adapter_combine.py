"""Adapters combined into a new one (merge_adapters) and a mergeable adapter as a LoRA for serving (to_lora).

Both read each adapter as a weight update per projection: a LoRA-type adapter as PEFT reads it (its A, B and
alpha/r from unipelt.peft_interop.peft_lora_state, the tensors export_peft writes), any other adapter whose every
module folds into its projection ((IA)³, DoRA, a linear bottleneck) as its dense ΔW. unipelt.adapter_merging
combines one projection's entries exactly as PEFT's add_weighted_adapter does (linear, cat, svd, ties, dare_linear,
dare_ties, magnitude_prune and their svd variants), or factors one dense ΔW by truncated SVD; the result is
attached as a new LoRA adapter through PEFT's config (attach_peft_state), so what is attached is what PEFT would
load. Nothing changes on the model until every projection is computed.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from . import compat
from .adapter_merging import COMBINATIONS, LoraFactors, merge_module, merge_plan, to_lora_factors
from .adapter_set import check_name
from .adapters import delete_adapter, rename_adapter, set_active
from .attach import adapter_set, refuse_wrapped, state_of
from .errors import AdapterFileError, AttachError, UnipeltError
from .io import owned_value
from .peft_interop import KEY_PREFIX, attach_peft_state, peft_lora_state
from .peft_names import target_suffixes
from .quantize import dense_weight
from .sites.names import ACTIVATION_SITES
from .weight_fold import chunk_rows

Entries = dict[str, "LoraFactors | torch.Tensor"]


def _lora_entries(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Entries:
    """module -> LoraFactors(A, B, alpha / r) of a PEFT LoRA state."""
    out: Entries = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(KEY_PREFIX):-len(".lora_A.weight")]
        b = tensors[f"{KEY_PREFIX}{module}.lora_B.weight"]
        rank = config.get("rank_pattern", {}).get(module, config["r"])
        alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
        out[module] = LoraFactors(a.detach(), b.detach(), alpha / rank)
    return out


def _dense_entries(model: nn.Module, name: str, caller: str) -> Entries:
    """module -> the adapter's dense ΔW [out, in] there, for an adapter whose every module folds into a weight."""
    state = state_of(model, name, caller)
    modules = dict(model.named_modules())
    out: Entries = {}
    for slot_name, slot in state.slots.items():
        host_name = slot_name.rpartition(".")[0]
        host = modules[host_name]
        reason = slot.cannot_merge(host)
        if reason is not None:
            raise AttachError(f"{caller}: adapter '{name}' has no weight update at '{slot_name}': {reason}")
        linear, factor = slot.linear_map(), slot.composer.merge_factor()
        if linear.bias is not None:
            raise AttachError(f"{caller}: adapter '{name}' changes the bias of '{host_name}', which a LoRA cannot")
        weight = dense_weight(host).detach()
        delta = torch.zeros_like(weight) if host_name not in out else out[host_name]
        with torch.no_grad():
            if slot.site in ACTIVATION_SITES:  # a per-feature scaling of the projection's input: its columns
                delta = delta + weight * (factor * linear.weight).to(weight.dtype)
            else:
                rows = chunk_rows(slot.chunk, weight.shape[0])
                part = (factor * linear.weight).to(weight.dtype)
                update = part[:, None] * weight[rows] if linear.diagonal else part
                delta = delta.clone()
                delta[rows] += update
        out[host_name] = delta
    return out


def weight_updates(model: nn.Module, name: str, caller: str) -> tuple[Entries, dict[str, Any] | None]:
    """The adapter's entries per projection and, for a LoRA-type one, its PEFT config."""
    try:
        config, tensors = peft_lora_state(model, name, caller)
    except AdapterFileError as lora_refusal:
        if state_of(model, name, caller).method.train_base != "none":
            raise AttachError(str(lora_refusal)) from None
        try:
            return _dense_entries(model, name, caller), None
        except AttachError:
            raise AttachError(f"{str(lora_refusal)}; and it does not fold into the weights either") from None
    if config.get("use_dora"):  # a DoRA direction with a magnitude: not a LoRA's ΔW; read it dense
        return _dense_entries(model, name, caller), None
    return _lora_entries(config, tensors), config


def _new_config(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                template: dict[str, Any] | None, fan_in_fan_out: bool) -> tuple[dict, dict]:
    """PEFT config and tensors of a scale-1 LoRA with the given factors."""
    ranks = {m: int(a.shape[0]) for m, (a, _) in factors.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": target_suffixes(set(factors), [n for n, _ in model.named_modules()]),
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {m: r for m, r in sorted(ranks.items()) if r != rank},
        "modules_to_save": None, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "base_model_name_or_path": (template or {}).get("base_model_name_or_path"),
    }
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return config, tensors


@compat.accepts_compiled
def merge_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], combination: str = "linear",
                   density: float | None = None, new_name: str = "merged", *, svd_rank: int | None = None,
                   majority_sign_method: str = "total", svd_clamp: float | None = None,
                   svd_full_matrices: bool = True, svd_driver: str | None = None,
                   generator: torch.Generator | None = None) -> str:
    """A new LoRA adapter `new_name` from `names` weighted by `weights`, as PEFT's add_weighted_adapter computes
    it (combination: linear | cat | svd | ties | dare_linear | dare_ties | magnitude_prune, or an *_svd variant).
    Adapters that are not LoRAs but fold into their weights ((IA)³, DoRA, linear bottlenecks) enter as their dense
    ΔW (svd-based combinations only). The new adapter is attached and made active; returns its name."""
    refuse_wrapped(model, "merge_adapters")
    aset = adapter_set(model)
    caller = "merge_adapters"
    check_name(new_name, caller)
    if new_name in aset.adapters:
        raise AttachError(f"{caller}: an adapter named '{new_name}' already exists")
    names = list(names) if not isinstance(names, str) else [names]
    if not names:
        raise AttachError(f"{caller}: no adapters to merge")
    if len(set(names)) != len(names):
        raise AttachError(f"{caller}: an adapter is listed twice in {names}")
    weights = list(weights)
    if len(weights) != len(names):
        raise AttachError(f"{caller}: {len(weights)} weights for {len(names)} adapters")
    if combination not in COMBINATIONS:
        raise AttachError(f"{caller}: combination {combination!r} is not one of: {', '.join(COMBINATIONS)}")
    read = [weight_updates(model, n, caller) for n in names]
    modules = [m for m, _ in model.named_modules() if any(m in entries for entries, _ in read)]
    if combination != "cat" and len({frozenset(e) for e, _ in read}) > 1:
        first = next(n for n, (e, _) in zip(names, read) if set(e) != set(read[0][0]))
        raise AttachError(f"{caller}: adapters '{names[0]}' and '{first}' modify different projections; only "
                          "combination 'cat' stacks adapters of different sites")
    # PEFT's model-level rank: each LoRA adapter's r (cat: their sum; svd: the largest, or svd_rank)
    ranks = [config["r"] for _, config in read if config]
    _, rank = merge_plan(combination, ranks or [svd_rank or 1], svd_rank)
    fan_in_fan_out = any(config and config.get("fan_in_fan_out") for _, config in read)
    factors = {}
    try:
        for module in modules:
            entries = {n: entries.get(module) for n, (entries, _) in zip(names, read)}
            factors[module] = merge_module(entries, weights, combination, rank=rank, density=density,
                                           majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                                           svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                                           fan_in_fan_out=fan_in_fan_out, generator=generator, module=module)
    except UnipeltError as exc:
        raise type(exc)(f"{caller}: {exc}") from None
    config, tensors = _new_config(model, factors, next((c for _, c in read if c), None), fan_in_fan_out)
    attach_peft_state(model, config, tensors, new_name, caller)
    return new_name


@compat.accepts_compiled
def to_lora(model: nn.Module, name: str | None = None, rank: int = 8, new_name: str | None = None
            ) -> dict[str, float]:
    """Turn a mergeable adapter into a LoRA of rank `rank` (its ΔW per projection by truncated SVD: exact when
    ΔW has that rank), for serving: exportable with export_peft, loadable by PEFT and vLLM. The LoRA replaces the
    adapter under its name (or is added as `new_name`). Returns {projection: ||ΔW − BA||_F / ||ΔW||_F}."""
    caller = "to_lora"
    refuse_wrapped(model, caller)
    state = state_of(model, name, caller)
    aset = adapter_set(model)
    if new_name is not None:
        check_name(new_name, caller)
        if new_name in aset.adapters:
            raise AttachError(f"{caller}: an adapter named '{new_name}' already exists")
    entries, config = weight_updates(model, state.name, caller)
    factors, errors = {}, {}
    for module in [m for m, _ in model.named_modules() if m in entries]:
        entry = entries[module]
        delta = entry.delta() if isinstance(entry, LoraFactors) else entry
        a, b, error = to_lora_factors(delta, rank, module=module)
        factors[module], errors[module] = (a, b), error
    if not factors:
        raise AttachError(f"{caller}: adapter '{state.name}' modifies no projection")
    lora_config, tensors = _new_config(model, factors, config, bool(config and config.get("fan_in_fan_out")))
    if state.trained_head:  # the task head the adapter trained travels with its LoRA, as PEFT's modules_to_save
        lora_config["modules_to_save"] = sorted({p.rpartition(".")[0] for p in state.trained_head})
        tensors.update({f"{KEY_PREFIX}{p}": owned_value(model, state, p).detach() for p in state.trained_head})
    if new_name is not None:
        attach_peft_state(model, lora_config, tensors, new_name, caller)
        return errors
    previous = copy.copy(aset.active)
    temporary = f"{state.name}-lora"
    while temporary in aset.adapters:
        temporary += "-"
    attach_peft_state(model, lora_config, tensors, temporary, caller)
    delete_adapter(model, state.name)
    rename_adapter(model, temporary, state.name)
    if previous is not None:
        set_active(model, previous)
    return errors


__all__ = ["merge_adapters", "to_lora", "weight_updates"]
