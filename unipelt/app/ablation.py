"""Ablations over He et al.'s axes: a method built from axis values, checked by the grammar before a job runs.

unipelt-train's `axes` node (schema AxesConfig) turns a sweep over axis values into methods:

    axes:
      use: pa                # presets whose modules make the method ('+' joins several: prefix+scaled_pa);
                             # null: the modules of the method group
      form: null             # each axis that is set replaces that key in every module
      at: null               # a site or a list of sites
      representation: null   # attn | ffn: He et al.'s modified representation, each module at its own granularity
                             # (heads stay heads, a sub-layer stays a sub-layer, LoRA's projections become
                             # attn.q/attn.v or ffn.up/ffn.down); instead of `at`
      insertion: null
      compose: null
      scale: null            # compose scale's factor: a number or "learned"
      sizes: {}              # module name -> its size (dim / length / rank); under method.budget only ratios count
                             # (the modules' budget_share, if any, is dropped: the sizes split the budget)

Method-level keys (`budget`, `train_base`, ...) come from the method group, so an experiment fixes the budget once
and every cell is sized to it by unipelt.budget. A module whose compose is not `scale` drops its own scale factor,
and one whose form changes keeps only the keys the new form takes (its size is then solved by the budget): these
are consequences of the axis value, not silent fixes. Anything the grammar refuses is refused by
unipelt.load_method, and the sweep lists it as skipped (hydra/sweeper=ablation, or the job itself in other sweeps).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from ..errors import MethodConfigError, allowed
from ..forms import FORMS
from ..sites.names import HEAD_SITES, PROJECTION_SITES
from ..spec import MethodSpec, load_method, module_keys, preset_dir

AXES = ("form", "at", "insertion", "compose")
REPRESENTATIONS = ("attn", "ffn")
SUBLAYER_SITES = ("attn", "cross_attn", "ffn")
# He et al.'s LoRA at a representation, as their code's attn_mode / ffn_mode lora: W_q and W_v, or W_1 and W_2.
PROJECTIONS_OF = {"attn": ["attn.q", "attn.v"], "ffn": ["ffn.up", "ffn.down"]}


@dataclass
class AxesConfig:
    use: Optional[str] = None
    form: Optional[str] = None
    at: Optional[Any] = None
    representation: Optional[str] = None
    insertion: Optional[str] = None
    compose: Optional[str] = None
    scale: Optional[Any] = None
    sizes: Dict[str, int] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) or OmegaConf.is_list(
        value) else value


def axes_set(axes: Any) -> dict[str, Any]:
    """The axis values given (null and empty ones left out)."""
    raw = _plain(axes) or {}
    return {k: v for k, v in raw.items() if v is not None and v != {}}


def _module_name(preset: str) -> str:
    return preset.replace("/", "_").replace("-", "_")


def _modules_of(use: str) -> list[dict[str, Any]]:
    modules = []
    presets = [p.strip() for p in str(use).split("+")]
    if not all(presets):
        raise MethodConfigError(f"axes.use: '{use}' has an empty preset name (join presets with '+')")
    for preset in presets:
        nested = preset_dir() / f"{preset}.yaml"  # a preset in a subfolder of conf/method (glue/mam)
        spec = load_method(nested if "/" in preset and nested.is_file() else preset)
        for module in spec.to_dict()["modules"]:
            if len(spec.modules) == 1:  # one-module presets are named after themselves (pa, lora, prefix)
                module["name"] = _module_name(preset)
            modules.append(module)
    return modules


def granularity(site: str) -> str:
    """How a site reaches its representation: `heads`, `sub-layer` or `projections`; any other site (embeddings,
    ffn.act, ffn.ln, all_linear) is its own kind."""
    if site in HEAD_SITES:
        return "heads"
    if site in SUBLAYER_SITES:
        return "sub-layer"
    return "projections" if site in PROJECTION_SITES else site


def represent(at: Any, value: str, module: str) -> Any:
    """`at` moved to the representation `value` at the granularity it has: attention heads (a prefix has no FFN
    counterpart: refused), a sub-layer (attn / ffn), or projections (PROJECTIONS_OF; kept when already there)."""
    if value not in REPRESENTATIONS:
        raise MethodConfigError(f"axes.representation: unknown value '{value}' (allowed: {allowed(REPRESENTATIONS)})")
    sites = list(at) if isinstance(at, (list, tuple)) else [at]
    kinds = {granularity(str(site)) for site in sites}
    here = {"ffn" if str(site).startswith("ffn") else "attn" for site in sites}  # cross-attention is attention
    if kinds == {"heads"}:
        if value != "attn":
            raise MethodConfigError(f"axes.representation: module '{module}' acts on attention heads ({', '.join(sites)})"
                                    f"; it has no '{value}' counterpart")
        return at
    if kinds == {"sub-layer"}:
        return at if here == {value} else value
    if kinds == {"projections"}:
        return at if here == {value} else list(PROJECTIONS_OF[value])
    raise MethodConfigError(f"axes.representation: module '{module}' at {', '.join(map(str, sites))} is not all heads, "
                            "sub-layers or projections; set axes.at instead")


def _apply(module: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    module = dict(module)
    if "representation" in given:
        if "at" in given:
            raise MethodConfigError("axes: set axes.at or axes.representation, not both")
        module["at"] = represent(module.get("at"), given["representation"], str(module.get("name", "?")))
    if "form" in given and given["form"] != module.get("form"):
        form = given["form"]
        if form not in FORMS:
            raise MethodConfigError(f"axes.form: unknown value '{form}' (allowed: {allowed(FORMS)})")
        module = {k: v for k, v in module.items() if k in module_keys(FORMS[form])}
    for key in AXES:
        if key in given:
            module[key] = given[key]
    if module.get("compose") != "scale":
        module.pop("scale", None)
    if "scale" in given:
        module["scale"] = given["scale"]  # the grammar refuses it next to another compose, and the cell is skipped
    return module


def cell_name(given: dict[str, Any], method_name: str) -> str:
    """The method's name in records and reports: its presets and the axis values set, e.g. pa:at=attn,parallel."""
    base = given.get("use") or method_name
    parts = []
    for key in (*AXES, "representation", "scale"):
        if key in given:
            value = given[key]
            parts.append(f"{key}={'/'.join(map(str, value)) if isinstance(value, list) else value}")
    for module, size in sorted((given.get("sizes") or {}).items()):
        parts.append(f"{module}={size}")
    return f"{base}:{','.join(parts)}" if parts else str(base)


def method_from_axes(method: Any, axes: Any) -> dict[str, Any] | None:
    """The method dict the axes make from the method group, or None when no axis is set (the method as it is).

    Raises MethodConfigError (one line naming the key) when the result is not a method the grammar allows."""
    built = _built_from_axes(method, axes)
    return None if built is None else built[0]


def _built_from_axes(method: Any, axes: Any) -> tuple[dict[str, Any], MethodSpec] | None:
    """method_from_axes's dict, and the spec it parses into (the only parse: the job goes on with that spec)."""
    given = axes_set(axes)
    if not given:
        return None
    base = _plain(method) or {}
    if not isinstance(base, dict):
        raise MethodConfigError(f"method: expected a mapping, got {type(base).__name__}")
    out = {k: copy.deepcopy(v) for k, v in base.items() if k != "modules"}
    modules = _modules_of(given["use"]) if "use" in given else [dict(m) for m in base.get("modules") or []]
    modules = [_apply(m, given) for m in modules]
    sizes = dict(given.get("sizes") or {})
    names = [m.get("name", f"m{i}") for i, m in enumerate(modules)]
    for name, size in sizes.items():
        if name not in names:
            raise MethodConfigError(f"axes.sizes: no module named '{name}' (modules: {allowed(names)})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise MethodConfigError(f"axes.sizes.{name}: must be a positive integer, got {size!r}")
    if sizes:  # sizes and budget shares are two ways to split a budget: the sizes given here win
        for module in modules:
            module.pop("budget_share", None)
    for name, module in zip(names, modules):
        form = FORMS.get(module.get("form"))  # an unknown form is named by load_method below, with its module
        if name in sizes and form is not None:  # the size key is the form's own (dim, length, init_r)
            if form.size_key is None:
                raise MethodConfigError(f"axes.sizes.{name}: form '{form.name}' has no size to set")
            module[form.size_key] = sizes[name]
    out["modules"] = modules
    out["name"] = cell_name(given, str(base.get("name", "custom")))
    return out, load_method(out)


def with_axes(cfg: DictConfig) -> DictConfig:
    """cfg with its method replaced by the one its axes make, the axes then cleared (so applying twice is applying
    once); unchanged when no axis is set. The job's overrides keep the axis values for the record."""
    return apply_axes(cfg)[0]


def apply_axes(cfg: DictConfig) -> tuple[DictConfig, MethodSpec | None]:
    """with_axes, and the method the axes built as a spec (None when no axis is set: cfg.method is then still to be
    parsed), so that a job parses its method once."""
    built = _built_from_axes(cfg.method, cfg.get("axes"))
    if built is None:
        return cfg, None
    with open_dict(cfg):
        cfg.method = OmegaConf.create(built[0])
        cfg.axes = OmegaConf.structured(AxesConfig)
    return cfg, built[1]


def cell_key(cfg: DictConfig) -> str:
    """What makes two jobs the same run: the built method and every other setting (for duplicates in a grid)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    container.pop("axes", None)
    method = dict(container.get("method") or {})
    method.pop("name", None)
    container["method"] = method
    return json.dumps(container, sort_keys=True, default=str)


__all__ = ["AXES", "REPRESENTATIONS", "AxesConfig", "apply_axes", "axes_set", "cell_key", "cell_name",
           "granularity", "method_from_axes", "represent", "with_axes"]
