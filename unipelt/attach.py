"""attach / detach / disabled: put a method's modules into any supported transformers model, in place.

Order of work: load and validate the spec, let each form resolve what needs the model (prepare), resolve every
placement and let each form build its slots (nothing on the model changes yet), then quantize the base (QLoRA),
register slots as child modules of their hosts, let every slot install its hooks, and freeze the base. All of it
is recorded on `model._unipelt` so detach() can undo it exactly.

Several adapters may sit on one model, each under a name (unipelt.adapter_set; `default` when none is given):
attach adds one and makes it the active adapter; unipelt.adapters switches, composes, renames and deletes them.

Order at a shared site: parallel slots are installed before sequential ones, so a sequential module sees h with
every parallel module's Δh already added (YAML order within each kind); see unipelt/slot.py.

A budget (`method.budget`) is solved above this layer (unipelt.api.attach, which is `unipelt.attach`):
attach_method takes sizes as they are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import compat
from .adapter_set import (DEFAULT, AdapterSet, CopyableHook, apply, check_enabled, check_name, check_not_fused,
                          child_name, install_hooks, remove_hooks)
from .errors import AttachError, MethodConfigError
from .forms import form_of
from .placement import Placement, projection_index, resolve
from .quantize import check_quantization, quantize_base, restore_base
from .model_snapshot import ModelSnapshot
from .slot import HostRef, Slot, like
from .spec import MethodSpec, load_method
from .trained_params import _listed_module_ids, check_train_base, trained_parameters

STATE_ATTR = "_unipelt"


@dataclass
class AttachedState:
    """One named adapter: its method, placements and slots (keyed by their saved names, the `default` adapter's
    child names), and what it trains besides its own modules."""
    method: MethodSpec
    placements: list[Placement]
    name: str = DEFAULT
    slots: dict[str, Slot] = field(default_factory=dict)  # full slot name -> slot
    # training-only modules a form registers on the model itself, shared by its slots (a prefix MLP), by name
    reparams: dict[str, nn.Module] = field(default_factory=dict)
    reparam_owners: dict[str, str] = field(default_factory=dict)  # reparam name -> the module spec that built it
    handles: list[Any] = field(default_factory=list)
    trained_base: list[str] = field(default_factory=list)  # base parameter names the method trains
    trained_head: list[str] = field(default_factory=list)  # task-head parameter names (outside base_model)
    merged: list[str] = field(default_factory=list)
    # method-level training objects reached through unipelt.optim (AdaLoRA's rank allocators), by name
    controllers: dict[str, Any] = field(default_factory=dict)

    def child(self, canonical: str) -> str:
        """The attribute name on the model of the child whose saved name is `canonical`."""
        return child_name(self.name, canonical)


@compat.accepts_compiled
def adapter_set(model: nn.Module) -> AdapterSet:
    aset = model.__dict__.get(STATE_ATTR)
    if aset is None:
        raise AttachError(f"no unipelt method is attached to this {type(model).__name__}; call unipelt.attach first")
    return aset


@compat.accepts_compiled
def state_of(model: nn.Module, name: str | None = None, caller: str = "unipelt") -> AttachedState:
    """The named adapter's state; without a name, the only adapter, else the only active one (else one line)."""
    aset = adapter_set(model)
    if name is not None:
        if name not in aset.adapters:
            raise AttachError(f"{caller}: no adapter named {name!r} (this model has: {', '.join(aset.adapters)})")
        return aset.adapters[name]
    if len(aset.adapters) == 1:
        return next(iter(aset.adapters.values()))
    active = aset.active_names()
    if len(active) == 1:
        return aset.adapters[active[0]]
    raise AttachError(f"{caller}: this model has {len(aset.adapters)} adapters ({', '.join(aset.adapters)}), "
                      f"{len(active)} of them active; pass name=")


@compat.accepts_compiled
def is_attached(model: nn.Module) -> bool:
    return STATE_ATTR in model.__dict__


def refuse_wrapped(model: Any, caller: str) -> None:
    """A PEFT PeftModel forwards attribute lookups to the model inside it, so it looks like a transformers model
    but its module names start with base_model.model.: say so plainly instead of failing on a name later."""
    if any(cls.__name__ == "PeftModel" for cls in type(model).__mro__):
        raise AttachError(f"{caller}: got a PEFT {type(model).__name__}; unipelt works on the transformers model "
                          "itself: pass model.get_base_model() (or model.merge_and_unload() to keep PEFT's LoRA)")


@compat.accepts_compiled
def check_model(model: Any, caller: str, name: str | None = None) -> str:
    """One line for what cannot take a method: not a transformers model, or a name already taken; returns the
    adapter's name."""
    refuse_wrapped(model, caller)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise AttachError(f"{caller}: expected a transformers PreTrainedModel, got {type(model).__name__}")
    name = DEFAULT if name is None else check_name(name, caller)
    if is_attached(model) and name in adapter_set(model).adapters:
        method = adapter_set(model).adapters[name].method.name
        raise AttachError(f"{caller}: an adapter named '{name}' (method '{method}') is already attached; pass "
                          "another name=, or call unipelt.detach(model) first")
    return name


def check_coexistence(model: nn.Module, spec: MethodSpec, name: str) -> None:
    """What two adapters on one base cannot differ in: the base's quantization; and an adapter that trains every
    base weight has the base to itself."""
    if not is_attached(model):
        return
    aset = adapter_set(model)
    if spec.quantize != aset.quantize:
        raise AttachError(f"attach: adapter '{name}' has quantize '{spec.quantize}' but the base already carries "
                          f"adapters with quantize '{aset.quantize}'; adapters of one model share one base")
    whole = [n for n, s in aset.adapters.items() if s.method.train_base == "all"]
    if spec.train_base == "all" or whole:
        who = name if spec.train_base == "all" else whole[0]
        raise AttachError(f"attach: adapter '{who}' trains every base weight (train_base: all); it cannot share "
                          "the model with other adapters (attach it to its own copy of the model)")


def prepare(model: nn.Module, spec: MethodSpec) -> MethodSpec:
    """The spec with what needs the model resolved by each form (prompt texts to token ids, prefix support)."""
    for index, module in enumerate(spec.modules):
        where = f"method '{spec.name}' module {index} ('{module.name}')"
        prepared = form_of(module.form).prepare(model, module, where)
        if prepared is not module:
            spec = spec.replace_module(index, **{"options": prepared.options})
    return spec


def prepare_counting(model: nn.Module, spec: MethodSpec) -> MethodSpec:
    """The spec, refused if its sizes are still to be solved for a budget (that happens above this layer)."""
    if spec.budget is not None:
        raise MethodConfigError(f"method '{spec.name}': budget {spec.budget!r} is solved by unipelt.attach "
                                "(or unipelt.solve_budget) before the modules are built")
    return spec


@compat.accepts_compiled
def attach_method(model: nn.Module, method: Any, name: str | None = None) -> nn.Module:
    """Attach `method` (preset name, YAML path, dict, DictConfig or MethodSpec) with its sizes as given, as the
    adapter `name` (default: "default"), and make it the active adapter."""
    name = check_model(model, "attach", name)
    if is_attached(model):
        check_enabled(adapter_set(model), "attach")
    spec = prepare(model, prepare_counting(model, load_method(method)))
    check_coexistence(model, spec, name)
    placements = resolve(model, spec) if spec.modules else []
    check_train_base(model, spec)
    _listed_module_ids(model, spec)  # an unknown train_modules name fails here, before anything changes
    to_quantize = []
    if spec.quantize != "none" and not is_attached(model):  # a second QLoRA adapter shares the quantized base
        check_quantization(model, spec)
        to_quantize = _all_linear_names(model)
    try:
        slots, reparams, controllers = _build(spec, placements, model, dict(model.named_modules()))
    except (MemoryError, RuntimeError) as exc:  # e.g. dim: 1000000000000; nothing on the model has changed
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
            raise
        raise AttachError(f"attach: method '{spec.name}' does not fit in memory ({_sizes(spec)}): "
                          f"{str(exc).splitlines()[0][:200]}") from None
    # All or nothing from here: whatever raises (a form's install, a quantization half-way), the model is put
    # back exactly as it was -- module tree, weights, hooks, routing, requires_grad -- before the error goes on.
    snapshot = ModelSnapshot(model)
    previous = model.__dict__.get(STATE_ATTR)
    quantized: list[tuple[str, nn.Module, Any]] = []
    try:
        quantize_base(model, spec, to_quantize, quantized)
        aset = previous if previous is not None else AdapterSet(quantize=spec.quantize)
        state = AttachedState(method=spec, placements=placements, name=name, controllers=controllers)
        _install(model, state, slots, reparams, dict(model.named_modules()))  # anew: quantized
        _claim(model, aset, state, first=previous is None)
        aset.quantized.extend(quantized)
        model.__dict__[STATE_ATTR] = aset
        aset.adapters[name] = state
        aset.hook_order.append(name)
        apply(model, aset, name, caller="attach")
    except BaseException:
        if previous is None:
            model.__dict__.pop(STATE_ATTR, None)
        else:
            _forget(previous, name, state if "state" in locals() else None)
        restore_base(model, quantized)
        snapshot.restore()
        raise
    return model


def _forget(aset: AdapterSet, name: str, state: "AttachedState | None") -> None:
    """Drop what a failed attach put into an existing set (the snapshot restores the model itself)."""
    if aset.adapters.get(name) is state:
        aset.adapters.pop(name, None)
    aset.hook_order = [n for n in aset.hook_order if n != name]
    aset.stored.pop(name, None)
    for pname in [p for p, owner in aset.in_force.items() if owner == name]:
        aset.in_force[pname] = None


def _claim(model: nn.Module, aset: AdapterSet, state: AttachedState, first: bool) -> None:
    """Record the base's trainability (first adapter) and give the new adapter its own copy of every base or head
    parameter it trains, starting from the original values (another adapter may have trained them since)."""
    state.trained_base, state.trained_head = trained_parameters(model, state.method)
    params = dict(model.named_parameters())
    if first:
        for pname, param in params.items():
            if ".unipelt_" not in f".{pname}" and param.dtype.is_floating_point:
                aset.original_requires_grad[pname] = param.requires_grad
    if state.method.train_base == "all":  # it has the base to itself (check_coexistence): no copies
        return
    own = aset.stored.setdefault(state.name, {})
    for pname in state.trained_base + state.trained_head:
        if pname not in aset.base_values:
            aset.base_values[pname] = params[pname].detach().clone()
            aset.in_force[pname] = None
        own[pname] = aset.base_values[pname].clone()


def _sizes(spec: MethodSpec) -> str:
    """'name: key=value' of every module's size option (the one its form declares)."""
    parts = []
    for m in spec.modules:
        key = form_of(m.form).size_key
        size = getattr(m.options, key, None) if key else None
        parts.append(f"{m.name}: {key}={size}" if isinstance(size, int) else f"{m.name}:")
    return "; ".join(sorted(set(parts)))


def _all_linear_names(model: nn.Module) -> list[str]:
    """QLoRA quantizes every projection of the transformer layers (the `all_linear` sites), except those the
    model keeps in float32 (transformers' `_keep_in_fp32_modules`, e.g. T5's `wo`, as its own 4-bit loading does)."""
    keep = compat.keep_in_fp32_modules(model)
    return [name for name in projection_index(model) if name.rpartition(".")[2] not in keep]


def _build(spec: MethodSpec, placements: list[Placement], model: nn.Module,
           modules: dict) -> tuple[list[Slot], dict[str, tuple[str, nn.Module]], dict[str, Any]]:
    """Every form builds the slots of its module specs' placements, without touching the model."""
    built: dict[int, Slot] = {}
    reparams: dict[str, nn.Module] = {}
    controllers: dict[str, Any] = {}
    for module in spec.modules:
        indices = [i for i, p in enumerate(placements) if p.spec.name == module.name]
        result = form_of(module.form).build(module, [placements[i] for i in indices], model, modules)
        for i, slot in zip(indices, result.slots):
            built[i] = slot.to(**like(modules[placements[i].h_name]))
        reparams.update({name: (module.name, child) for name, child in result.children.items()})
        controllers.update(result.controllers)
    return [built[i] for i in range(len(placements))], reparams, controllers


def _install(model: nn.Module, state: AttachedState, slots: list[Slot], reparams: dict, modules: dict) -> None:
    """Register the adapter's modules under its child names and install its hooks (unipelt.adapter_set)."""
    for name, (owner, reparam) in reparams.items():
        model.add_module(state.child(name), reparam)
        state.reparams[name] = reparam
        state.reparam_owners[name] = owner
    for p, slot in zip(state.placements, slots):
        modules[p.host_name].add_module(state.child(p.slot_name), slot)
        state.slots[f"{p.host_name}.{p.slot_name}" if p.host_name else p.slot_name] = slot
        slot.bind_host(HostRef(model, p.host_name))
    install_hooks(model, state)
    # New modules start in training mode; follow the model's, so an eval model stays deterministic (dropout).
    for module in [*state.slots.values(), *state.reparams.values()]:
        module.train(model.training)


@compat.accepts_compiled
def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove the named adapter (unipelt.delete_adapter), or without a name every adapter with every module, hook
    and routing; the last one gone restores the original parameters' trainability and the unquantized base."""
    aset = adapter_set(model)
    if name is not None:
        state_of(model, name, "detach")
        check_not_fused(aset, name, "detach")
        if len(aset.adapters) > 1:
            remove_adapter(model, name)
            return model
    for handle in aset.row_hooks:
        handle.remove()
    for adapter in reversed(list(aset.adapters)):
        _remove_modules(model, aset.adapters[adapter])
    restore_base(model, aset.quantized)
    params = dict(model.named_parameters())
    for pname, flag in aset.original_requires_grad.items():
        params[pname].requires_grad_(flag)
    del model.__dict__[STATE_ATTR]
    return model


def _remove_modules(model: nn.Module, state: AttachedState) -> None:
    unmerge_slots(model, state.name)
    remove_hooks(state)
    modules = dict(model.named_modules())
    for full_name in state.slots:
        parent, _, child = full_name.rpartition(".")
        delattr(modules[parent] if parent else model, state.child(child))
    for reparam in state.reparams:
        delattr(model, state.child(reparam))


@compat.accepts_compiled
def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete one adapter of several: its modules, hooks and copies of shared parameters go; what it held in the
    model goes back to the original values; the remaining active adapters stay active (else the first one)."""
    aset = adapter_set(model)
    state = aset.adapters[name]
    remaining_active = [n for n in aset.active_names() if n != name]
    _remove_modules(model, state)
    del aset.adapters[name]
    aset.hook_order = [n for n in aset.hook_order if n != name]
    aset.stored.pop(name, None)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname, owner in list(aset.in_force.items()):
            if owner == name:
                params[pname].copy_(aset.base_values[pname])
                aset.in_force[pname] = None
    still_owned = {p for n in aset.adapters for p in aset.owned(n)}
    for pname in [p for p in aset.base_values if p not in still_owned]:
        del aset.base_values[pname], aset.in_force[pname]
        params[pname].requires_grad_(aset.original_requires_grad.get(pname, False))
    # Every remaining hook is installed anew: what the deleted adapter installed for others too (the routing of an
    # attention module that carries prefixes of several adapters) must come back.
    for other in aset.adapters.values():
        remove_hooks(other)
    aset.hook_order, aset.active = [], None
    apply(model, aset, remaining_active or next(iter(aset.adapters)), caller="delete_adapter")


@compat.accepts_compiled
def unmerge_slots(model: nn.Module, name: str | None = None) -> list[str]:
    """Undo every merge of an adapter (last merged first): each slot applies its own inverse to its host's
    weights."""
    state = state_of(model, name, "unmerge")
    modules = dict(model.named_modules())
    undone = []
    for slot_name in reversed(state.merged):
        state.slots[slot_name].unmerge(modules[slot_name.rpartition(".")[0]], slot_name)
        undone.append(slot_name)
    state.merged.clear()
    return undone


@compat.accepts_compiled
def fold_prefixes(model: nn.Module, name: str | None = None) -> None:
    """Fold every training aid (a prefix reparameterisation MLP, a P-tuning prompt encoder) into the plain vectors
    it produces and drop it (outputs unchanged)."""
    state = state_of(model, name, "fold_prefixes")
    for slot in state.slots.values():
        slot.fold()
    for reparam in state.reparams:
        delattr(model, state.child(reparam))
    state.reparams.clear()
    state.reparam_owners.clear()
    state.method = state.method.folded()


@contextlib.contextmanager
@compat.accepts_compiled
def disabled(model: nn.Module, name: str | None = None) -> Iterator[nn.Module]:
    """Within the block the model behaves exactly as the base model (merged weights excepted: unmerge first):
    every adapter is switched off; with a name, that adapter only (the others act as they did)."""
    aset = adapter_set(model)
    names = [state_of(model, name, "disabled").name] if name is not None else list(aset.adapters)
    if any(aset.adapters[n].merged for n in names):
        raise AttachError("disabled: modules are merged into the weights; call unipelt.unmerge(model) first")
    if aset.disabled:
        raise AttachError("disabled: already inside unipelt.disabled(model)")
    slots = [slot for n in names for slot in aset.adapters[n].slots.values()]
    previous = [slot.active for slot in slots]
    for slot in slots:
        slot.active = False
    aset.disabled = True
    try:
        yield model
    finally:
        aset.disabled = False
        for slot, flag in zip(slots, previous):
            slot.active = flag


__all__ = ["attach_method", "check_model", "check_train_base", "prepare_counting", "trained_parameters", "detach",
           "unmerge_slots", "disabled", "state_of", "is_attached", "fold_prefixes",
           "refuse_wrapped", "adapter_set", "remove_adapter", "AttachedState", "CopyableHook"]
