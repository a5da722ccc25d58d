"""Resolve a method's sites against a concrete model: which modules, which layers, what shapes.

Nothing here mutates the model; attach() acts on the placements this returns, so every error surfaces first.
"""

from __future__ import annotations

import dataclasses
import warnings

from torch import nn

from .errors import AttachError, allowed
from .sites import family_of, linear_dims
from .sites.names import ALL_LINEAR, INPUT_SITES, PROJECTION_SITES
from .sites.table import Activation, Family, Heads, Norm, Projection, SubLayer
from .forms import form_of
from .module_spec import ModuleSpec, Placement
from .spec import MethodSpec


def base_path(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def resolve(model: nn.Module, method: MethodSpec) -> list[Placement]:
    family = family_of(model.config)
    modules = dict(model.named_modules())
    root = base_path(model)
    placements: list[Placement] = []
    missing: list[AttachError] = []
    for index, spec in enumerate(method.modules):
        where = f"method '{method.name}' module {index} ('{spec.name}')"
        try:
            host = form_of(spec.form).host
            placements.extend(dataclasses.replace(p, host=host) for p in _place_module(spec, where, family, modules, root))
        except MissingSiteError as error:
            missing.append(error)
    # A kind of site this model lacks (cross-attention on an encoder, a post-LN LayerNorm on a pre-LN decoder) is
    # skipped, so one preset attaches to every family; a method that finds nothing at all here is an error.
    if missing and not placements:
        raise missing[0]
    for error in missing:
        warnings.warn(f"{error} -- that module is skipped on this model", stacklevel=4)
    return placements


class MissingSiteError(AttachError):
    """A known site kind that this model's family does not have."""


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _place_module(spec: ModuleSpec, where: str, family: Family, modules: dict, root: str) -> list[Placement]:
    if any(site in INPUT_SITES for site in spec.at):
        return [_input_placement(spec, where, family, modules, root)]
    stacks = [s for s in spec.stacks if s in family.stacks]
    if not stacks:
        raise AttachError(
            f"{where}: stacks {list(spec.stacks)} not in this model (its stacks: {allowed(family.stacks)})"
        )
    out: list[Placement] = []
    for site, site_stacks in _site_stacks(spec, stacks, family, modules, root, where):
        for stack_name in site_stacks:
            stack = family.stacks[stack_name]
            layer_list = modules.get(_join(root, stack.path))
            if layer_list is None:
                raise AttachError(f"{where}: layer list '{_join(root, stack.path)}' not found in the model")
            n_layers = len(layer_list)
            layers = range(n_layers) if spec.layers == "all" else spec.layers
            for layer in layers:
                if not 0 <= layer < n_layers:
                    raise AttachError(
                        f"{where}: layers: index {layer} out of range for the {stack_name} stack "
                        f"({n_layers} layers: 0..{n_layers - 1})"
                    )
                layer_path = _join(root, stack.path, str(layer))
                out.append(_placement(spec, site, stack_name, layer, stack.sites[site], stack.sites,
                                      layer_path, modules, family, where))
    return out


def _input_placement(spec: ModuleSpec, where: str, family: Family, modules: dict, root: str) -> Placement:
    """A module at the input acts once, on the input sequence: h is the token embedding output, x the base model
    (whose forward it sees). For encoder-decoders it goes to the encoder only."""
    if family.inputs is None:
        raise AttachError(f"{where}: site 'embeddings' is not mapped for this model family (add Inputs to its Family)")
    tokens = _join(root, family.inputs.tokens)
    embedding = modules.get(tokens)
    if embedding is None or not isinstance(getattr(embedding, "weight", None), nn.Parameter):
        raise AttachError(f"{where}: token embedding '{tokens}' not found in the model")
    d_model = int(embedding.weight.shape[1])
    stack = "encoder" if "encoder" in family.stacks else "decoder"
    encoder = _join(root, family.inputs.encoder) if family.inputs.encoder else ""
    return Placement(spec=spec, site="embeddings", stack=stack, layer=0, kind="embeddings", h_name=tokens,
                     x_name=root, chunk=None, d_in=d_model, d_out=d_model, d_x=d_model, encoder_name=encoder)


def _site_stacks(spec: ModuleSpec, stacks: list[str], family: Family, modules: dict, root: str,
                 where: str) -> list[tuple[str, list[str]]]:
    """(site, stacks having it) for each site of `at`; `all_linear` becomes every projection the model has."""
    out: dict[str, list[str]] = {}
    absent: list[str] = []
    for site in spec.at:
        if site == ALL_LINEAR:
            for linear in PROJECTION_SITES:
                found = [s for s in stacks if _projection_exists(family.stacks[s], linear, modules, root)]
                if found:
                    out.setdefault(linear, [])
                    out[linear] += [s for s in found if s not in out[linear]]
            continue
        site_stacks = [s for s in stacks if site in family.stacks[s].sites]
        if not site_stacks:
            absent.append(site)
            continue
        out.setdefault(site, [])
        out[site] += [s for s in site_stacks if s not in out[site]]
    if not out and absent:
        known = sorted({k for s in stacks for k in family.stacks[s].sites})
        raise MissingSiteError(f"{where}: site '{absent[0]}' does not exist in this model (its sites: {allowed(known)})")
    return list(out.items())


def _projection_exists(stack, site: str, modules: dict, root: str) -> bool:
    entry = stack.sites.get(site)
    if not isinstance(entry, Projection):
        return False
    first_layer = _join(root, stack.path, "0")
    return any(_join(first_layer, path) in modules for path in entry.path.split("|"))


def _find(modules: dict, layer_path: str, paths: str, where: str) -> str:
    """Full name of the first existing candidate among 'a|b' alternatives."""
    for path in paths.split("|"):
        name = _join(layer_path, path)
        if name in modules:
            return name
    raise AttachError(f"{where}: module '{_join(layer_path, paths)}' not found in the model")


def _input_width(modules: dict, layer_path: str, entry: Activation, where: str) -> int:
    """Width of the FFN input x: the input of its up projection."""
    up = _find(modules, layer_path, entry.up, where)
    return linear_dims(modules[up], up)[0]


def _placement(spec, site, stack, layer, entry, stack_sites, layer_path, modules, family, where) -> Placement:
    common = dict(spec=spec, site=site, stack=stack, layer=layer)
    if isinstance(entry, Projection):
        name = _find(modules, layer_path, entry.path, where)
        d_x, d_out = linear_dims(modules[name], name)
        if entry.chunk is not None:
            d_out //= entry.chunk[1]
        d_in = d_out if spec.insertion == "sequential" else d_x
        return Placement(**common, kind="projection", h_name=name, x_name=name, chunk=entry.chunk,
                         d_in=d_in, d_out=d_out, d_x=d_x)
    if isinstance(entry, Activation):  # h: the input of the projection `h`, the FFN's hidden activation
        h_name = _find(modules, layer_path, entry.h, where)
        x_name = _find(modules, layer_path, entry.x, where)
        width, _ = linear_dims(modules[h_name], h_name)
        d_x = _input_width(modules, layer_path, entry, where)
        d_in = width if spec.insertion == "sequential" else d_x
        return Placement(**common, kind="activation", h_name=h_name, x_name=x_name, chunk=None,
                         d_in=d_in, d_out=width, d_x=d_x)
    if isinstance(entry, SubLayer):
        h_name = _find(modules, layer_path, entry.h, where)
        x_name = _find(modules, layer_path, entry.x, where)
        _, d_model = linear_dims(modules[h_name], h_name)
        return Placement(**common, kind="sublayer", h_name=h_name, x_name=x_name, chunk=None,
                         d_in=d_model, d_out=d_model, d_x=d_model)
    if isinstance(entry, Norm):
        ln_name = _find(modules, layer_path, entry.ln, where) if entry.ln else layer_path
        if entry.pre_ln:
            down = _find(modules, layer_path, entry.down, where)
            d_model = linear_dims(modules[down], down)[1]
        else:
            shape = getattr(modules[ln_name], "normalized_shape", None)
            if not shape:
                raise AttachError(f"{where}: '{ln_name}' is not a LayerNorm")
            d_model = int(shape[-1])
        return Placement(**common, kind="norm", h_name=ln_name, x_name=ln_name, chunk=None,
                         d_in=d_model, d_out=d_model, d_x=d_model)
    assert isinstance(entry, Heads)
    attn_name = _find(modules, layer_path, entry.attention, where)
    o_name = _find(modules, layer_path, entry.o, where)
    attention = modules[attn_name]
    head_dim = getattr(attention, family.head_dim_attr, None)
    if not isinstance(head_dim, int):
        raise AttachError(f"{where}: attention module '{attn_name}' has no integer '{family.head_dim_attr}'")
    heads_in, d_model = linear_dims(modules[o_name], o_name)
    k_entry = stack_sites[site.replace("heads", "k")]
    k_name = _find(modules, layer_path, k_entry.path, where)
    k_out = linear_dims(modules[k_name], k_name)[1] // (k_entry.chunk[1] if k_entry.chunk else 1)
    d_in = heads_in if spec.insertion == "sequential" else d_model
    q_entry = stack_sites[site.replace("heads", "q")]
    return Placement(**common, kind="heads", h_name=o_name, x_name=attn_name, chunk=None, d_in=d_in,
                     d_out=heads_in, d_x=d_model, n_heads=heads_in // head_dim, head_dim=head_dim, kv_heads=k_out // head_dim,
                     q_name=_find(modules, layer_path, q_entry.path, where), q_chunk=q_entry.chunk)



def projection_index(model: nn.Module) -> dict[str, list[tuple[str, int, str, tuple[int, int] | None]]]:
    """Every projection module of the model -> its unipelt sites as (stack, layer, site, chunk)."""
    family = family_of(model.config)
    modules = dict(model.named_modules())
    root = base_path(model)
    index: dict[str, list] = {}
    for stack_name, stack in family.stacks.items():
        layers = modules.get(".".join(p for p in (root, stack.path) if p))
        for layer in range(len(layers) if layers is not None else 0):
            layer_path = ".".join(p for p in (root, stack.path, str(layer)) if p)
            for site, entry in stack.sites.items():
                if not isinstance(entry, Projection):
                    continue
                name = next((f"{layer_path}.{path}" for path in entry.path.split("|") if f"{layer_path}.{path}" in modules),
                            None)
                if name is not None:
                    index.setdefault(name, []).append((stack_name, layer, site, entry.chunk))
    return index
