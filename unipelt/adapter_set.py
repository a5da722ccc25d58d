"""The named adapters of one model, and what the active composition makes of them.

`AdapterSet` (kept in the model's __dict__ by unipelt.attach) holds each adapter's AttachedState by name, the
active block (unipelt.composition), which adapters train, the base's original trainability, and the values of
the base / task-head parameters that more than one adapter trains (a classifier every task adapter learns,
BitFit's biases): each adapter keeps its own copy, and the active one's copy is in the model.

`apply` puts a composition into effect: it checks everything first (names, shapes, what each slot can do, merged
adapters, shared trained parameters), then re-installs the hooks in the block's order (a Stack's second adapter
must run after its first at every site), sets every slot's `active` flag and Route, the trainability of every
parameter, and swaps in the owner's values. Nothing changes when a check fails.

Adapter "default" keeps the child names an adapter always had (unipelt_<module>_<site>); another adapter's
children are unipelt_<adapter>__<module>_<site>. Saved files use the first form for every adapter.
"""

from __future__ import annotations

import copy
import re
import types
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .composition import Average, BatchSplit, Parallel, Stack, as_block, names_in
from .errors import AttachError
from .forms import form_of
from .row_values import install_row_values, owner_among
from .slot import Route, SharedInput, Slot

DEFAULT = "default"
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
PREFIX = "unipelt_"


def check_name(name: Any, caller: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or "__" in name:
        raise AttachError(f"{caller}: adapter name {name!r} must start with a letter and hold only letters, "
                          "digits, '_' and '-' (no '__')")
    return name


def child_name(adapter: str, canonical: str) -> str:
    """The attribute name of an adapter's child module whose saved (canonical) name is `canonical`."""
    if adapter == DEFAULT or not canonical.startswith(PREFIX):
        return canonical
    return f"{PREFIX}{adapter}__{canonical[len(PREFIX):]}"


@dataclass
class AdapterSet:
    adapters: dict[str, Any] = field(default_factory=dict)  # name -> unipelt.attach.AttachedState
    active: Stack | None = None
    trainable: set[str] = field(default_factory=set)
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    quantize: str = "none"
    quantized: list = field(default_factory=list)  # (name, original module, device), restored with the last one
    base_values: dict[str, torch.Tensor] = field(default_factory=dict)  # original values of a shared parameter
    stored: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # adapter -> values not in the model
    in_force: dict[str, str | None] = field(default_factory=dict)  # parameter -> whose values the model holds
    hook_order: list[str] = field(default_factory=list)
    row_hooks: list = field(default_factory=list)  # unipelt.row_values handles while rows need other values
    disabled: bool = False  # inside unipelt.disabled(model): the composition cannot change

    def active_names(self) -> list[str]:
        return [] if self.active is None else list(dict.fromkeys(names_in(self.active)))

    def owned(self, adapter: str) -> list[str]:
        state = self.adapters[adapter]
        return list(state.trained_base) + list(state.trained_head)


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


def install_hooks(model: nn.Module, state: Any) -> None:
    """Install one adapter's hooks (parallel slots before sequential ones at a shared site; YAML order within each
    kind), keeping the handles on its state."""
    modules = dict(model.named_modules())
    pairs = list(zip(state.placements, state.slots.values()))
    for p, slot in sorted(pairs, key=lambda pair: pair[0].spec.insertion == "sequential"):
        state.handles.extend(slot.install(p, modules, model))
    for handle in state.handles:  # copy.deepcopy(model) must give hooks that call the copy's own slots
        if hasattr(handle, "hooks_dict_ref"):
            hooks = handle.hooks_dict_ref()
            if not isinstance(hooks[handle.id], CopyableHook):
                hooks[handle.id] = CopyableHook(hooks[handle.id])


def remove_hooks(state: Any) -> None:
    for handle in reversed(state.handles):
        handle.remove()
    state.handles.clear()


def order_hooks(model: nn.Module, aset: AdapterSet, order: list[str]) -> None:
    """Re-install every adapter's hooks so that they run in `order` at every site (the others after them)."""
    order = order + [n for n in aset.adapters if n not in order]
    if order == aset.hook_order:
        return
    for name in aset.hook_order:
        if name in aset.adapters:
            remove_hooks(aset.adapters[name])
    for name in order:
        install_hooks(model, aset.adapters[name])
    aset.hook_order = order


def _site_key(state: Any, canonical: str) -> str:
    placement = state.placements[list(state.slots).index(canonical)]
    return f"{placement.h_name}|{'in' if placement.modifies_input else 'out'}|{placement.chunk}"


def plan_routes(aset: AdapterSet, block: Stack, rows_of: dict[str, torch.Tensor] | None = None,
                batch: int | None = None, what: str = "set_active") -> dict[int, Route | None]:
    """Every slot of the block's adapters -> its Route (None: every row, reading h); raises before any change."""
    routes: dict[int, Route | None] = {}
    seen: set[str] = set()
    placed: list[tuple[str, Slot, Route]] = []  # asked for refusals once every block's members are known

    def slots(name: str) -> Iterable[tuple[str, Slot]]:
        if name in seen:
            raise AttachError(f"{what}: adapter '{name}' appears twice in the composition")
        seen.add(name)
        return aset.adapters[name].slots.items()

    def place(name: str, rows: torch.Tensor | None, shared: dict | None, weight: float, total: int | None) -> None:
        for canonical, slot in slots(name):
            if rows is None and shared is None:
                routes[id(slot)] = None
                continue
            route = Route(rows=rows, batch=total, weight=weight, what=what)
            placed.append((name, slot, route))
            if shared is not None:
                key = _site_key(aset.adapters[name], canonical)
                members = shared.setdefault(key, {"cell": SharedInput(), "routes": [], "names": []})
                if name in members["names"]:
                    raise AttachError(f"{what}: adapter '{name}' has two modules on '{key.split('|')[0]}'; inside "
                                      "a Parallel / Average block each adapter must have one module per site")
                members["names"].append(name)
                members["routes"].append(route)
                members["cell"].members.append(slot)
                route.shared = members["cell"]
            routes[id(slot)] = route

    def walk(member: Any, rows: torch.Tensor | None, total: int | None) -> None:
        if isinstance(member, str):
            place(member, rows, None, 1.0, total)
        elif isinstance(member, (Parallel, Average)):
            shared: dict = {}
            weights = member.weights if isinstance(member, Average) else (1.0,) * len(member.members)
            for name, weight in zip(member.members, weights):
                place(name, rows, shared, weight, total)
            for group in shared.values():
                group["routes"][0].first = True
                group["routes"][-1].last = True
        elif isinstance(member, Stack):
            for inner in member.members:
                walk(inner, rows, total)
        elif isinstance(member, BatchSplit):
            if rows is not None:
                raise AttachError(f"{what}: a BatchSplit inside a BatchSplit or a mixed batch has no meaning")
            size = sum(member.sizes)
            start = 0
            for inner, count in zip(member.members, member.sizes):
                walk(inner, torch.arange(start, start + count), size)
                start += count

    for member in block.members:
        if isinstance(member, str) and rows_of is not None:
            place(member, rows_of[member], None, 1.0, batch)
        else:
            walk(member, None, None)
    for name, slot, route in placed:
        refusal = slot.route_refusal(route)
        if refusal is not None:
            kind = "a mixed batch" if what == "mixed_batch" else "this composition"
            raise AttachError(f"{what}: adapter '{name}' cannot take part in {kind}: {refusal}")
    return routes


def check_block(aset: AdapterSet, spec: Any, caller: str) -> Stack:
    block = as_block(spec)
    for name in names_in(block):
        if name not in aset.adapters:
            raise AttachError(f"{caller}: no adapter named '{name}' (this model has: "
                              f"{', '.join(aset.adapters) or 'none'})")
    return block


def check_enabled(aset: AdapterSet, caller: str) -> None:
    if aset.disabled:
        raise AttachError(f"{caller}: called inside unipelt.disabled(model); change adapters after the block")


def check_merged(aset: AdapterSet, caller: str) -> None:
    merged = [name for name, state in aset.adapters.items() if state.merged]
    if merged:
        raise AttachError(f"{caller}: adapter '{merged[0]}' is merged into the weights; call "
                          f"unipelt.unmerge(model, name='{merged[0]}') first")


def owners_in_force(aset: AdapterSet, names: list[str], caller: str, routed: bool) -> dict[str, str]:
    """Shared trained parameter -> the active adapter whose values the model holds. Where every row goes through
    every active adapter, two of them cannot both train one parameter; where rows go to different adapters, the
    first owner's values are in the model and unipelt.row_values serves the other rows."""
    owner: dict[str, str] = {}
    for name in names:
        for pname in aset.owned(name):
            if pname in owner and owner[pname] != name and not routed:
                raise AttachError(f"{caller}: adapters '{owner[pname]}' and '{name}' each train '{pname}' and would "
                                  "both act on every row; activate one of them, or split the rows (BatchSplit, "
                                  "mixed_batch)")
            owner.setdefault(pname, name)
    return owner


def row_groups(block: Stack) -> list[tuple[torch.Tensor, list[str]]] | None:
    """(rows, adapters acting on them) of a block that splits the batch, or None when every row sees the same."""
    for member in block.members:
        if isinstance(member, BatchSplit):
            groups, start = [], 0
            others = [n for m in block.members if m is not member for n in names_in(m)]
            for inner, count in zip(member.members, member.sizes):
                groups.append((torch.arange(start, start + count), names_in(inner) + others))
                start += count
            return groups
    return None


def swap_values(model: nn.Module, aset: AdapterSet, owner: dict[str, str]) -> None:
    """Put each shared trained parameter's values for `owner` (or the original, for no owner) into the model."""
    if all(owner.get(pname) == current for pname, current in aset.in_force.items()):
        return  # nothing to swap (the common case of every batch of a mixed-batch loop): no walk of the model
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname, current in list(aset.in_force.items()):
            wanted = owner.get(pname)
            if wanted == current:
                continue
            param = params[pname]
            if current is not None:
                aset.stored.setdefault(current, {})[pname] = param.detach().clone()
            source = aset.base_values[pname] if wanted is None else aset.stored[wanted].pop(pname)
            param.copy_(source)
            aset.in_force[pname] = wanted


def set_trainable(model: nn.Module, aset: AdapterSet, owner: dict[str, str]) -> None:
    """Adapter parameters train when their adapter is in `aset.trainable`; a base / head parameter when an
    adapter in force that trains it is."""
    adapter_of: dict[int, str] = {}
    for name, state in aset.adapters.items():
        for module in [*state.slots.values(), *state.reparams.values()]:
            for p in module.parameters():
                adapter_of[id(p)] = name
    trained = {pname for pname, name in owner.items() if name in aset.trainable}
    for pname, param in model.named_parameters():
        if id(param) in adapter_of:
            param.requires_grad_(adapter_of[id(param)] in aset.trainable)
        elif pname in aset.original_requires_grad:
            param.requires_grad_(pname in trained)


def apply(model: nn.Module, aset: AdapterSet, spec: Any, trainable: Any = None, caller: str = "set_active") -> None:
    """Put `spec` (a name, a list of names or a block) into effect; every check runs before anything changes."""
    block = check_block(aset, spec, caller)
    check_merged(aset, caller)
    check_enabled(aset, caller)
    names = list(dict.fromkeys(names_in(block)))
    train = set(names) if trainable is None else set(_names(trainable, caller))
    for name in train:
        if name not in names:
            raise AttachError(f"{caller}: trainable adapter '{name}' is not active")
    routes = plan_routes(aset, block, what=caller)
    groups = row_groups(block)
    for adapters in ([names] if groups is None else [a for _, a in groups]):  # rows of a BatchSplit apart
        check_single_prompt(aset, list(dict.fromkeys(adapters)), caller)
        check_fused_apart(aset, adapters, caller)
    owner = owners_in_force(aset, names, caller, groups is not None)
    if groups is not None:
        for rows, adapters in groups:  # two owners of one parameter on the same rows: refused here
            for pname in {p for a in adapters for p in aset.owned(a)}:
                owner_among(aset, adapters, pname, caller)
    batch = sum(len(rows) for rows, _ in groups) if groups else 0
    commit(model, aset, block, names, routes, owner, train, groups, batch, caller)


def commit(model: nn.Module, aset: AdapterSet, block: Stack | None, names: list[str], routes: dict[int, Route | None],
           owner: dict[str, str], train: set[str], groups: list | None = None, batch: int = 0,
           caller: str = "set_active", reorder: bool = True) -> None:
    """Make a checked plan the model's state: hook order, slot flags and routes, values in force, trainability,
    and the hooks that give rows of other adapters their own values of shared trained parameters. reorder=False
    keeps the hooks as installed (a mixed batch: each row has one adapter, so the order of different adapters'
    hooks at a site changes nothing, and re-installing them at every batch would cost more than the batch)."""
    for handle in aset.row_hooks:
        handle.remove()
    aset.row_hooks.clear()
    if reorder:
        order_hooks(model, aset, names)
    for name, state in aset.adapters.items():
        for slot in state.slots.values():
            slot.active = name in names
            slot.route = routes.get(id(slot))
    aset.active, aset.trainable = block, train
    swap_values(model, aset, owner)
    set_trainable(model, aset, owner)
    if groups:
        aset.row_hooks.extend(install_row_values(model, aset, groups, batch, caller))


def check_single_prompt(aset: AdapterSet, names: list[str], caller: str) -> None:
    """Two adapters that insert virtual tokens at the input cannot both act: each would shift the other's."""
    prompts = [n for n in names if aset.adapters[n].method.input_tokens() > 0]
    if len(prompts) > 1:
        raise AttachError(f"{caller}: adapters '{prompts[0]}' and '{prompts[1]}' both insert virtual tokens at the "
                          "input; only one of them can be active at a time")


def fused_members(aset: AdapterSet, name: str) -> list[str]:
    """The adapters that adapter `name` runs itself (an AdapterFusion's members; its forms' uses_adapters)."""
    return [m for module in aset.adapters[name].method.modules for m in form_of(module.form).uses_adapters(module)]


def check_not_fused(aset: AdapterSet, name: str, caller: str) -> None:
    """An adapter that another one runs itself (fuses) stays while that one exists."""
    users = [other for other in aset.adapters if other != name and name in fused_members(aset, other)]
    if users:
        raise AttachError(f"{caller}: adapter '{name}' is fused by adapter '{users[0]}', which runs it; delete "
                          f"'{users[0]}' first")


def check_fused_apart(aset: AdapterSet, names: list[str], caller: str) -> None:
    """An adapter and one it runs itself cannot both act on the same rows (its Δh would be added twice)."""
    for name in names:
        both = next((m for m in fused_members(aset, name) if m in names), None)
        if both is not None:
            raise AttachError(f"{caller}: adapter '{name}' runs '{both}' itself (it fuses it): '{both}' active on the "
                              f"same rows would add its Δh twice; activate '{name}' without '{both}'")


def _names(value: Any, caller: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AttachError(f"{caller}: trainable must be an adapter name or a list of names, got {value!r}")


__all__ = ["check_enabled", "DEFAULT", "AdapterSet", "CopyableHook", "apply", "commit", "owners_in_force", "check_single_prompt", "check_block", "check_merged", "check_name", "check_not_fused",
           "child_name", "install_hooks", "order_hooks", "plan_routes", "remove_hooks", "set_trainable",
           "swap_values"]
