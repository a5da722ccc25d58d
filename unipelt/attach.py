"""attach / detach / disabled: put a method's modules into any supported transformers model, in place.

Order of work: load and validate the spec, resolve every placement and build every new module (nothing on the
model changes yet), then quantize the base (QLoRA), register slots as child modules of the modules they modify,
add forward hooks, route prefixed attention modules, and freeze the base. All of it is recorded on
`model._unipelt` so detach() can undo it exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import compat
from .attention import PrefixSlot, check_prefix_support, install_prefix_config, model_eager_attention
from .compose import Composer, Slot
from .errors import AttachError
from .forms import Bottleneck, HeadBottleneck, Prefix, PrefixReparam
from .forms.svd import OrthogonalRegulariser, SVDDelta
from .prompting import PromptSlot, build_prompt_slot, install_prompt_hooks, resolve_prompt_texts
from .quantize import check_quantization, quantize_base, restore_base
from .rank_allocator import RankAllocator
from .sites import Placement, resolve
from .spec import MethodSpec, load_method

STATE_ATTR = "_unipelt"


@dataclass
class AttachedState:
    method: MethodSpec
    placements: list[Placement]
    slots: dict[str, nn.Module] = field(default_factory=dict)  # full slot name -> Slot / PrefixSlot
    reparams: dict[str, PrefixReparam] = field(default_factory=dict)  # child name on the model -> shared MLP
    handles: list[Any] = field(default_factory=list)
    attention_configs: list[tuple[nn.Module, Any]] = field(default_factory=list)
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


def attach(model: nn.Module, method: Any) -> nn.Module:
    """Attach `method` (preset name, YAML path, dict, DictConfig or MethodSpec) to `model` in place."""
    spec = load_method(method)
    refuse_wrapped(model, "attach")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise AttachError(f"attach: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if is_attached(model):
        raise AttachError(
            f"attach: method '{state_of(model).method.name}' is already attached; call unipelt.detach(model) first"
        )
    if spec.budget is not None:
        # Solving counts on a meta copy of the architecture (never this model). budget.py sits above attach
        # (it counts through accounting, which attaches), so it is imported lazily to keep the layering one-way.
        from .budget import solve_budget

        spec = solve_budget(spec, model.config)
    spec = resolve_prompt_texts(model, spec)  # prompt texts -> token ids, checked against the vocabulary
    placements = resolve(model, spec) if spec.modules else []
    if spec.train_base == "bias" and not any(n.endswith("bias") for n, _ in model.base_model.named_parameters()):
        raise AttachError(f"method '{spec.name}': train_base 'bias' but this {model.config.model_type} has no biases")
    modules = dict(model.named_modules())
    # Every transformers-private name the placed forms will read is checked before anything changes.
    compat.check_model(model, prompts=any(p.spec.form == "prompt" for p in placements),
                       prefixed_attention=[modules[p.x_name] for p in placements if p.spec.form == "prefix"])
    _listed_module_ids(model, spec)  # an unknown train_modules name fails here, before anything changes
    if any(p.spec.form == "prefix" for p in placements):
        check_prefix_support(model)
    to_quantize = []
    if spec.quantize != "none":
        check_quantization(model, spec)
        to_quantize = _all_linear_names(model, spec)
    modules = dict(model.named_modules())
    try:
        built, reparams = _build(placements, modules, model)
    except (MemoryError, RuntimeError) as exc:  # e.g. dim: 1000000000000; nothing on the model has changed
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
            raise
        sizes = sorted({f"{m.name}: " + ", ".join(f"{k}={getattr(m, k)}" for k in ("dim", "length", "init_r")
                                                  if isinstance(getattr(m, k, None), int)) for m in spec.modules})
        raise AttachError(f"attach: method '{spec.name}' does not fit in memory ({'; '.join(sizes)}): "
                          f"{str(exc).splitlines()[0][:200]}") from None
    controllers = _svd_controllers(placements, built)
    quantized = quantize_base(model, spec, to_quantize)
    _install(model, spec, placements, built, reparams, dict(model.named_modules()))  # anew: quantize replaced some
    state_of(model).controllers.update(controllers)
    state_of(model).quantized.extend(quantized)
    return model


def _all_linear_names(model: nn.Module, spec: MethodSpec) -> list[str]:
    """QLoRA quantizes every projection of the transformer layers (the `all_linear` sites), except those the
    model keeps in float32 (transformers' `_keep_in_fp32_modules`, e.g. T5's `wo`, as its own 4-bit loading does)."""
    probe = load_method({"name": spec.name, "modules": [
        {"form": "bottleneck", "at": "all_linear", "insertion": "parallel", "compose": "add"}]})
    keep = compat.keep_in_fp32_modules(model)
    names = dict.fromkeys(p.h_name for p in resolve(model, probe))
    return [name for name in names if name.rpartition(".")[2] not in keep]


def _svd_key(p: Placement) -> str:
    return f"{p.stack}.{p.layer}.{p.site}"


def _svd_rank(p: Placement, known: dict[str, set[str]]) -> int:
    if p.spec.rank_pattern is None:
        return p.spec.init_r
    pattern = dict(p.spec.rank_pattern)
    unknown = sorted(set(pattern) - known[p.spec.name])
    if unknown:
        raise AttachError(f"module '{p.spec.name}': rank_pattern key '{unknown[0]}' matches no placement "
                          f"(keys are 'stack.layer.site', e.g. '{sorted(known[p.spec.name])[0]}')")
    return pattern.get(_svd_key(p), p.spec.init_r)


def _svd_controllers(placements: list[Placement], built: list[nn.Module]) -> dict[str, Any]:
    """Per svd module spec: its orthogonal regulariser (a mean over all its matrices, so it sees them all) and,
    while it is still to be pruned (no rank_pattern yet), its rank allocator (one global budget)."""
    groups: dict[str, dict[str, SVDDelta]] = {}
    specs = {}
    for p, slot in zip(placements, built):
        if p.spec.form == "svd":
            groups.setdefault(p.spec.name, {})[_svd_key(p)] = slot.form
            specs[p.spec.name] = p.spec
    controllers: dict[str, Any] = {}
    for name, forms in groups.items():
        controllers[f"unipelt_{name}_orthogonal_regulariser"] = OrthogonalRegulariser(
            specs[name].orth_reg_weight, list(forms.values()))
        if specs[name].rank_pattern is None:
            controllers[f"unipelt_{name}_rank_allocator"] = RankAllocator(specs[name], forms)
    return controllers


def _like(module: nn.Module) -> dict[str, Any]:
    weight = next((p for p in module.parameters(recurse=False)), None)
    if weight is None:
        weight = next(module.parameters(), None)
    if weight is None:
        return {}
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}


def _build(placements: list[Placement], modules: dict,
           model: nn.Module) -> tuple[list[nn.Module], dict[str, PrefixReparam]]:
    """Create every new module without touching the model."""
    reparams: dict[str, PrefixReparam] = {}
    built: list[nn.Module] = []
    prefix_sites: dict[str, list[Placement]] = {}
    for p in placements:
        if p.spec.form == "prefix":
            prefix_sites.setdefault(p.spec.name, []).append(p)
    for name, group in prefix_sites.items():
        spec = group[0].spec
        if spec.mlp_dim is not None:
            d_model = group[0].d_x
            reparam = PrefixReparam(spec.length, d_model, spec.mlp_dim, [p.kv_heads * p.head_dim for p in group])
            reparams[f"unipelt_{name}_reparam"] = reparam.to(**_like(modules[group[0].x_name]))
    site_index: dict[str, int] = {}
    svd_keys: dict[str, set[str]] = {}
    for p in placements:
        if p.spec.form == "svd":
            svd_keys.setdefault(p.spec.name, set()).add(_svd_key(p))
    for p in placements:
        like = _like(modules[p.h_name])
        if p.spec.form == "prefix":
            index = site_index.get(p.spec.name, 0)
            site_index[p.spec.name] = index + 1
            reparam = reparams.get(f"unipelt_{p.spec.name}_reparam")
            prefix = Prefix(p.spec.length, p.kv_heads, p.head_dim, reparam, index)
            attention = modules[p.x_name]
            query = (modules[p.q_name], p.q_chunk) if p.spec.score == "relu" else None
            slot = PrefixSlot(p.spec, prefix, p.site, model.config, model_eager_attention(attention), p.d_x, query)
        elif p.spec.form == "prompt":
            slot = build_prompt_slot(p, modules, model)
        else:
            if p.spec.form == "svd":
                form = SVDDelta(p.spec, p.d_in, p.d_out, _svd_rank(p, svd_keys))
            elif p.kind == "heads":
                form = HeadBottleneck(_sized(p.spec, p.d_in), p.d_in, p.n_heads, p.head_dim)
            else:
                form = Bottleneck(_sized(p.spec, p.d_in), p.d_in, p.d_out)
            # A sigmoid gate reads what the form reads (Mao et al.: x for LoRA, the adapter's input h for a
            # sequential adapter).
            slot = Slot(p.spec, form, Composer(p.spec, p.d_in), p.site, p.chunk)
        built.append(slot.to(**like))
    return built, reparams


def _sized(spec, d_in: int):
    """The bottleneck width d / reduction_factor where the spec gives a factor (UniPELT's adapter: d/16)."""
    if spec.reduction_factor is None:
        return spec
    return dataclasses.replace(spec, dim=max(1, d_in // spec.reduction_factor))


def _capture_hook(slot: Slot):
    def hook(module, args, kwargs):
        slot.captured_x = compat.module_input(args, kwargs) if slot.enabled else None
    return hook


def _output_hook(slot: Slot, same_module: bool):
    def hook(module, args, kwargs, output):
        if not slot.enabled:
            return None
        if same_module:
            x = compat.module_input(args, kwargs)
        else:
            x, slot.captured_x = slot.captured_x, None
        if isinstance(output, tuple):
            return (slot(output[0], x),) + output[1:]
        return slot(output, x)
    return hook


def _heads_hook(slot: Slot):
    def hook(module, args, kwargs):
        if not slot.enabled:
            return None
        x, slot.captured_x = slot.captured_x, None
        return (slot(args[0], x),) + tuple(args[1:]), kwargs
    return hook


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


def _norm_hook(slot: Slot):
    """Pfeiffer placement (AdapterHub). Post-LN, at the output LayerNorm: its input is z = h + residual; Δ (and a
    gate) read LN(z), the hook's output, and the same LayerNorm is applied again to z + Δ. Pre-LN, at the module
    whose output is z = h + residual: z + Δ with Δ read from z."""
    def hook(module, args, output):
        if not slot.enabled:
            return None
        if isinstance(module, nn.LayerNorm):
            composed = slot.composer(args[0], slot.form(output), output)
            return nn.functional.layer_norm(composed, module.normalized_shape, module.weight, module.bias, module.eps)
        z = output[0] if isinstance(output, tuple) else output
        composed = slot.composer(z, slot.form(z), z)
        return (composed,) + tuple(output[1:]) if isinstance(output, tuple) else composed
    return hook


def _install(model, spec, placements, built, reparams, modules) -> None:
    state = AttachedState(method=spec, placements=placements)
    for name, reparam in reparams.items():
        model.add_module(name, reparam)
        state.reparams[name] = reparam
    routed: set[int] = set()
    for p, slot in zip(placements, built):
        host = modules[p.host_name]
        host.add_module(p.slot_name, slot)
        state.slots[f"{p.host_name}.{p.slot_name}" if p.host_name else p.slot_name] = slot
        if isinstance(slot, PrefixSlot):
            if id(host) not in routed:
                routed.add(id(host))
                state.attention_configs.append((host, install_prefix_config(host)))
            if slot.reads_input:  # UniPELT's prefix gate, He et al.'s ReLU prefix read the attention input x
                state.handles.append(host.register_forward_pre_hook(_capture_hook(slot), with_kwargs=True))
            continue
        if isinstance(slot, PromptSlot):
            state.handles.extend(install_prompt_hooks(model, slot, p, modules))
            continue
        h_module = modules[p.h_name]
        same = p.x_name == p.h_name
        if not same:
            state.handles.append(modules[p.x_name].register_forward_pre_hook(_capture_hook(slot), with_kwargs=True))
        if p.kind == "heads":
            state.handles.append(h_module.register_forward_pre_hook(_heads_hook(slot), with_kwargs=True))
        elif p.kind == "norm":
            state.handles.append(h_module.register_forward_hook(_norm_hook(slot)))
        else:
            state.handles.append(h_module.register_forward_hook(_output_hook(slot, same), with_kwargs=True))
    for handle in state.handles:  # copy.deepcopy(model) must give hooks that call the copy's own slots
        hooks = handle.hooks_dict_ref()
        hooks[handle.id] = CopyableHook(hooks[handle.id])
    # New modules start in training mode; follow the model's, so an eval model stays deterministic (dropout).
    for module in [*state.slots.values(), *state.reparams.values()]:
        module.train(model.training)
    _freeze(model, spec, state)
    model.__dict__[STATE_ATTR] = state


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


def _freeze(model: nn.Module, spec: MethodSpec, state: AttachedState) -> None:
    base = getattr(model, "base_model", model)
    base_ids = {id(p) for p in base.parameters()}
    norms = _norm_ids(base) if spec.train_base == "layernorm" else set()
    pretrained_head = _pretrained_head_ids(model) - base_ids
    listed = _listed_module_ids(model, spec)
    for name, param in model.named_parameters():
        if ".unipelt_" in f".{name}":
            param.requires_grad_(True)
            continue
        if not param.dtype.is_floating_point:  # a quantized base weight: frozen by nature, restored by detach
            continue
        state.requires_grad[name] = param.requires_grad
        in_base = id(param) in base_ids
        if spec.train_base == "all" or id(param) in listed:
            train = True
        elif in_base:
            train = (spec.train_base == "bias" and name.endswith("bias")) or id(param) in norms
        else:
            train = spec.train_head and id(param) not in pretrained_head
        param.requires_grad_(train)
        if train:
            (state.trained_base if in_base else state.trained_head).append(name)


def detach(model: nn.Module) -> nn.Module:
    """Remove every unipelt module, hook and routing; restores the original parameters' trainability."""
    state = state_of(model)
    if state.merged:
        from .merge import unmerge  # merge sits above attach; imported lazily to keep the layering one-way

        unmerge(model)
    for handle in state.handles:
        handle.remove()
    for attention, config in state.attention_configs:
        attention.config = config
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


def fold_prefixes(model: nn.Module) -> None:
    """Fold every prefix reparameterisation MLP (and P-tuning prompt encoder) into plain vectors and drop them
    (outputs unchanged)."""
    state = state_of(model)
    for slot in state.slots.values():
        if isinstance(slot, PrefixSlot):
            slot.prefix.fold()
        elif isinstance(slot, PromptSlot):
            slot.fold()
    for name in state.reparams:
        delattr(model, name)
    state.reparams.clear()
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


__all__ = ["attach", "detach", "disabled", "state_of", "is_attached", "adapter_parameter_names", "fold_prefixes",
           "refuse_wrapped"]
