"""attach / detach / disabled: put a method's modules into any supported transformers model, in place.

Order of work: load and validate the spec, let each form resolve what needs the model (prepare), resolve every
placement and let each form build its slots (nothing on the model changes yet), then quantize the base (QLoRA),
register slots as child modules of their hosts, let every slot install its hooks, and freeze the base. All of it
is recorded on `model._unipelt` so detach() can undo it exactly.

Order at a shared site: parallel slots are installed before sequential ones, so a sequential module sees h with
every parallel module's Δh already added (YAML order within each kind); see unipelt/slot.py.

A budget (`method.budget`) is solved above this layer (unipelt.api.attach, which is `unipelt.attach`):
attach_method takes sizes as they are.
"""

from __future__ import annotations

import contextlib
import copy
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import nn

from . import compat
from .errors import AttachError, MethodConfigError
from .forms import form_of
from .placement import Placement, projection_index, resolve
from .quantize import check_quantization, quantize_base, restore_base
from .model_snapshot import ModelSnapshot
from .slot import HostRef, Slot, like
from .spec import MethodSpec, load_method

STATE_ATTR = "_unipelt"


@dataclass
class AttachedState:
    method: MethodSpec
    placements: list[Placement]
    slots: dict[str, Slot] = field(default_factory=dict)  # full slot name -> slot
    # training-only modules a form registers on the model itself, shared by its slots (a prefix MLP), by name
    reparams: dict[str, nn.Module] = field(default_factory=dict)
    reparam_owners: dict[str, str] = field(default_factory=dict)  # reparam name -> the module spec that built it
    handles: list[Any] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    trained_base: list[str] = field(default_factory=list)  # base parameter names the method trains
    trained_head: list[str] = field(default_factory=list)  # task-head parameter names (outside base_model)
    merged: list[str] = field(default_factory=list)
    # method-level training objects reached through unipelt.optim (AdaLoRA's rank allocators), by name
    controllers: dict[str, Any] = field(default_factory=dict)
    quantized: list[tuple[str, nn.Module, Any]] = field(default_factory=list)  # (name, original, device)


def state_of(model: nn.Module) -> AttachedState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise AttachError(f"no unipelt method is attached to this {type(model).__name__}; call unipelt.attach first")
    return state


def is_attached(model: nn.Module) -> bool:
    return STATE_ATTR in model.__dict__


def refuse_wrapped(model: Any, caller: str) -> None:
    """A PEFT PeftModel forwards attribute lookups to the model inside it, so it looks like a transformers model
    but its module names start with base_model.model.: say so plainly instead of failing on a name later."""
    if any(cls.__name__ == "PeftModel" for cls in type(model).__mro__):
        raise AttachError(f"{caller}: got a PEFT {type(model).__name__}; unipelt works on the transformers model "
                          "itself: pass model.get_base_model() (or model.merge_and_unload() to keep PEFT's LoRA)")
    if type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper: its names start with _orig_mod.
        raise AttachError(f"{caller}: got a torch.compile'd model; {caller} the model itself, then compile it")


def check_model(model: Any, caller: str) -> None:
    """One line for what cannot take a method: not a transformers model, or one that already has one."""
    refuse_wrapped(model, caller)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise AttachError(f"{caller}: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if is_attached(model):
        raise AttachError(
            f"{caller}: method '{state_of(model).method.name}' is already attached; call unipelt.detach(model) first"
        )


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


def check_train_base(model: nn.Module, spec: MethodSpec) -> None:
    base = getattr(model, "base_model", model)
    if spec.train_base == "bias" and not any(n.endswith("bias") for n, _ in base.named_parameters()):
        raise AttachError(f"method '{spec.name}': train_base 'bias' but this {model.config.model_type} has no biases")


def attach_method(model: nn.Module, method: Any) -> nn.Module:
    """Attach `method` (preset name, YAML path, dict, DictConfig or MethodSpec) with its sizes as given."""
    check_model(model, "attach")
    spec = prepare(model, prepare_counting(model, load_method(method)))
    placements = resolve(model, spec) if spec.modules else []
    check_train_base(model, spec)
    _listed_module_ids(model, spec)  # an unknown train_modules name fails here, before anything changes
    to_quantize = []
    if spec.quantize != "none":
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
    quantized: list[tuple[str, nn.Module, Any]] = []
    try:
        quantize_base(model, spec, to_quantize, quantized)
        state = _install(model, spec, placements, slots, reparams, dict(model.named_modules()))  # anew: quantized
        state.controllers.update(controllers)
        state.quantized.extend(quantized)
    except BaseException:
        restore_base(model, quantized)
        snapshot.restore()
        raise
    return model


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


class CopyableHook:
    """A hook closure that copy.deepcopy copies with the model: its closure cells (the slot it calls, ...) are
    deep-copied through the same memo as the module tree, so a copied model's hooks call the copied slots. (A plain
    function is copied by reference: the copy would keep calling the original model's slots, in silence.)"""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "CopyableHook":
        cells = tuple(types.CellType(copy.deepcopy(c.cell_contents, memo)) for c in self.fn.__closure__ or ())
        fn = types.FunctionType(self.fn.__code__, self.fn.__globals__, self.fn.__name__, self.fn.__defaults__,
                                cells or None)
        fn.__kwdefaults__ = self.fn.__kwdefaults__
        return CopyableHook(fn)


def _install(model, spec, placements, slots, reparams, modules) -> AttachedState:
    state = AttachedState(method=spec, placements=placements)
    for name, (owner, reparam) in reparams.items():
        model.add_module(name, reparam)
        state.reparams[name] = reparam
        state.reparam_owners[name] = owner
    for p, slot in zip(placements, slots):
        modules[p.host_name].add_module(p.slot_name, slot)
        state.slots[f"{p.host_name}.{p.slot_name}" if p.host_name else p.slot_name] = slot
    # Parallel before sequential at a shared site (sorted is stable: YAML order within each kind).
    for p, slot in sorted(zip(placements, slots), key=lambda pair: pair[0].spec.insertion == "sequential"):
        slot.bind_host(HostRef(model, p.host_name))
        state.handles.extend(slot.install(p, modules, model))
    for handle in state.handles:  # copy.deepcopy(model) must give hooks that call the copy's own slots
        if hasattr(handle, "hooks_dict_ref"):
            hooks = handle.hooks_dict_ref()
            hooks[handle.id] = CopyableHook(hooks[handle.id])
    # New modules start in training mode; follow the model's, so an eval model stays deterministic (dropout).
    for module in [*state.slots.values(), *state.reparams.values()]:
        module.train(model.training)
    _freeze(model, spec, state)
    model.__dict__[STATE_ATTR] = state
    return state


def _pretrained_head_ids(model: nn.Module) -> set[int]:
    """Parameters of a pretrained LM head outside the base model (an untied lm_head, BERT's MLM head): a model with
    output embeddings is a language model whose head came with its weights. Any other head (classifier, score,
    tagger, QA span head) is newly initialised for the task."""
    get = getattr(model, "get_output_embeddings", None)
    if get is None or get() is None:
        return set()
    return {id(p) for p in model.parameters()}


def _listed_module_ids(model: nn.Module, spec: MethodSpec) -> set[int]:
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


def trained_parameters(model: nn.Module, spec: MethodSpec) -> tuple[list[str], list[str]]:
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


def _freeze(model: nn.Module, spec: MethodSpec, state: AttachedState) -> None:
    state.trained_base, state.trained_head = trained_parameters(model, spec)
    train = set(state.trained_base) | set(state.trained_head)
    for name, param in model.named_parameters():
        if ".unipelt_" in f".{name}":
            param.requires_grad_(True)
            continue
        if not param.dtype.is_floating_point:  # a quantized base weight: frozen by nature, restored by detach
            continue
        state.requires_grad[name] = param.requires_grad
        param.requires_grad_(name in train)


def detach(model: nn.Module) -> nn.Module:
    """Remove every unipelt module, hook and routing; restores the original parameters' trainability."""
    state = state_of(model)
    unmerge_slots(model)
    for handle in reversed(state.handles):
        handle.remove()
    modules = dict(model.named_modules())
    for full_name in state.slots:
        parent, _, child = full_name.rpartition(".")
        delattr(modules[parent] if parent else model, child)
    for name in state.reparams:
        delattr(model, name)
    restore_base(model, state.quantized)
    params = dict(model.named_parameters())
    for name, flag in state.requires_grad.items():
        params[name].requires_grad_(flag)
    del model.__dict__[STATE_ATTR]
    return model


def unmerge_slots(model: nn.Module) -> list[str]:
    """Undo every merge (last merged first): each slot applies its own inverse to its host's weights."""
    state = state_of(model)
    modules = dict(model.named_modules())
    undone = []
    for name in reversed(state.merged):
        state.slots[name].unmerge(modules[name.rpartition(".")[0]], name)
        undone.append(name)
    state.merged.clear()
    return undone


def fold_prefixes(model: nn.Module) -> None:
    """Fold every training aid (a prefix reparameterisation MLP, a P-tuning prompt encoder) into the plain vectors
    it produces and drop it (outputs unchanged)."""
    state = state_of(model)
    for slot in state.slots.values():
        slot.fold()
    for name in state.reparams:
        delattr(model, name)
    state.reparams.clear()
    state.reparam_owners.clear()
    state.method = state.method.folded()


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model behaves exactly as the base model (merged weights excepted: unmerge first)."""
    state = state_of(model)
    if state.merged:
        raise AttachError("disabled: modules are merged into the weights; call unipelt.unmerge(model) first")
    slots = list(state.slots.values())
    previous = [slot.active for slot in slots]
    for slot in slots:
        slot.active = False
    try:
        yield model
    finally:
        for slot, flag in zip(slots, previous):
            slot.active = flag


def adapter_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if ".unipelt_" in f".{name}"]


__all__ = ["attach_method", "check_model", "check_train_base", "prepare_counting", "trained_parameters", "detach",
           "unmerge_slots", "disabled", "state_of", "is_attached", "adapter_parameter_names", "fold_prefixes",
           "refuse_wrapped"]
