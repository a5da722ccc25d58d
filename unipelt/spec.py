"""Method specs: immutable, validated descriptions of a PEFT method as modules on He et al.'s four axes.

A method is a list of modules; each module fixes a functional form (`form`), the representation it modifies
(`at`), what it reads (`insertion`) and how its output meets the hidden state (`compose`), plus the form's own
options. Everything is checked here, before any model is touched: unknown keys, wrong types, unknown values
and combinations that cannot work raise MethodConfigError with one line naming the key. What a form allows and
which options it has is read from the form itself (unipelt.forms): this module names no form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import MethodConfigError, allowed, read_utf8
from .package_files import conf_dir
from .forms import FORMS, Form, form_of
from .module_spec import ModuleSpec
from .sites.names import ALL_AT, ALL_LINEAR, NORM_SITES, PROJECTION_SITES, SITES, STACKS
from .spec_values import (
    budget_value,
    choice_value,
    expect_value,
    layers_value,
    load_yaml,
    names_value,
    no_repeats,
    positive_float_value,
    probability_value,
    scale_value,
)

INSERTIONS = ("sequential", "parallel")
COMPOSITIONS = ("add", "scale", "gate", "sigmoid_gate")
TRAIN_BASE = ("none", "all", "bias", "layernorm")
QUANTIZE = ("none", "nf4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# Optimizer names a trainer reads from `method.optimizer` (QLoRA: paged 8-bit AdamW through bitsandbytes).
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
AXIS_KEYS = ("form", "at", "insertion", "compose")


def module_to_yaml(module: ModuleSpec) -> dict[str, Any]:
    """One module as load_method reads it back."""
    form = form_of(module.form)
    entry: dict[str, Any] = {"form": module.form, "name": module.name, "at": list(module.at),
                             "insertion": module.insertion, "compose": module.compose}
    if form.per_layer:
        entry["layers"] = list(module.layers) if isinstance(module.layers, tuple) else module.layers
        entry["stacks"] = list(module.stacks)
    if module.compose == "scale":
        entry["scale"] = module.scale
    if module.lr is not None:
        entry["lr"] = module.lr
    if module.budget_share is not None:
        entry["budget_share"] = module.budget_share
    entry.update(form.to_yaml(module.options))
    form.finish_yaml(module, entry)
    return entry


@dataclass(frozen=True)
class MethodSpec:
    name: str
    modules: tuple[ModuleSpec, ...] = ()
    # which base weights stay trainable: none, all (full fine-tuning), bias (BitFit) or layernorm (Houlsby et al.
    # train every LayerNorm of the base along with the adapters)
    train_base: str = "none"
    # A newly initialised task head (classifier, regression, tagging) trains; a pretrained LM head stays frozen.
    train_head: bool = True
    # Extra trainable modules, by name or name suffix (PEFT's modules_to_save), e.g. ["lm_head"] or ["embed_tokens"]
    train_modules: tuple[str, ...] = ()
    # Equal-budget comparisons: "0.5%" of the base model's parameters or an added-parameter count. attach()
    # solves the module sizes for it (unipelt.budget) and the attached spec carries the sizes, budget None.
    budget: str | int | None = None
    # QLoRA (Dettmers et al. 2023): base projections frozen in 4-bit NF4 (bitsandbytes), computed in
    # compute_dtype; double_quant quantizes the block scales too. optimizer: what the trainer should build.
    quantize: str = "none"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True
    optimizer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that load_method reads back into an equal spec (used in adapter files)."""
        out: dict[str, Any] = {"name": self.name, "train_base": self.train_base, "train_head": self.train_head}
        out["modules"] = [module_to_yaml(module) for module in self.modules]
        if self.train_modules:
            out["train_modules"] = list(self.train_modules)
        if self.budget is not None:
            out["budget"] = self.budget
        if self.quantize != "none":
            out.update(quantize=self.quantize, compute_dtype=self.compute_dtype, double_quant=self.double_quant)
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer
        return out

    def folded(self) -> "MethodSpec":
        """The same method with training aids (a prefix MLP, a prompt encoder) folded away: what is saved."""
        modules = tuple(dataclasses.replace(m, options=form_of(m.form).folded(m.options)) for m in self.modules)
        return dataclasses.replace(self, modules=modules)

    def input_tokens(self) -> int:
        """Positions the method adds to every input sequence (prompt tokens), as its forms declare them."""
        return sum(form_of(m.form).input_tokens(m.options) for m in self.modules)

    def replace_module(self, index: int, **changes: Any) -> "MethodSpec":
        modules = list(self.modules)
        modules[index] = modules[index].replace(**changes)
        return dataclasses.replace(self, modules=tuple(modules))


METHOD_KEYS = ("name", "modules", "train_base", "train_head", "train_modules", "budget", "quantize", "compute_dtype",
               "double_quant", "optimizer")


def module_keys(form: Form) -> set[str]:
    """Every key a module of this form accepts: the axes, the common keys that apply, the form's options."""
    keys = set(AXIS_KEYS) | {"name", "lr", "budget_share"} | set(form.option_names())
    if "scale" in form.compositions:
        keys.add("scale")
    if form.per_layer:
        keys |= {"layers", "stacks"}
    return keys


def preset_dir() -> Path:
    """conf/method of the imported package (unipelt.package_files says where that is)."""
    return conf_dir() / "method"


def list_presets() -> list[str]:
    """Every preset name load_method takes, sub-folders included as `folder/name` (glue/mam)."""
    root = preset_dir()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def load_method(source: Any) -> MethodSpec:
    """Read a method from a preset name, a YAML path, a dict or an OmegaConf DictConfig, and validate it."""
    if isinstance(source, MethodSpec):
        return source
    if isinstance(source, (str, Path)):
        return _from_yaml(_resolve_yaml(source))
    raw = _to_container(source)
    if not isinstance(raw, Mapping):
        raise MethodConfigError(
            f"method: expected a preset name, a YAML path, a dict or a DictConfig, got {type(source).__name__}"
        )
    return _build_method(dict(raw))


def _resolve_yaml(source: str | Path) -> Path:
    """The YAML file a source names. A Path, a name ending in .yaml/.yml, an absolute path or one with `..` is a
    file; a plain name (`mam`) is a preset; a name with a slash (`glue/mam`) is a file when one exists there
    (relative to the working directory), else the preset of that sub-folder of conf/method: an existing file is
    what a user who typed a path meant, and nobody keeps an extension-less file named like a preset by accident."""
    text = str(source)
    path = Path(text)
    # an absolute path or one with `..` cannot be a preset: a preset name stays inside conf/method
    if isinstance(source, Path) or text.endswith((".yaml", ".yml")) or path.is_absolute() or ".." in path.parts:
        if not path.is_file():
            raise MethodConfigError(f"method file not found: {path}")
        return path
    if "/" in text and path.is_file():
        return path
    preset = preset_dir() / f"{text}.yaml"
    if preset.is_file():
        return preset
    if "/" in text:
        raise MethodConfigError(f"method '{text}': no file {path.absolute()} and no preset {preset} "
                                f"(presets: {allowed(list_presets())})")
    raise MethodConfigError(f"unknown method preset '{text}' (allowed: {allowed(list_presets())})")


def _from_yaml(path: Path) -> MethodSpec:
    try:
        raw = load_yaml(read_utf8(path, MethodConfigError, "method file"))
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise MethodConfigError(f"method file {path}: invalid YAML ({first})") from None
    if not isinstance(raw, Mapping):
        raise MethodConfigError(f"method file {path}: expected a mapping at the top level")
    raw = dict(raw)
    raw.setdefault("name", path.stem)
    return _build_method(raw)


def _to_container(source: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return source
    if isinstance(source, DictConfig):
        return OmegaConf.to_container(source, resolve=True)
    return source


def _build_method(raw: dict[str, Any]) -> MethodSpec:
    raw.pop("_target_", None)
    unknown = sorted(set(raw) - set(METHOD_KEYS))
    if unknown:
        raise MethodConfigError(f"method: unknown key '{unknown[0]}' (allowed: {allowed(METHOD_KEYS)})")
    name = expect_value(raw.get("name", "custom"), str, "method.name")
    where = f"method '{name}'"
    modules_raw = raw.get("modules") or []
    if not isinstance(modules_raw, (list, tuple)):
        raise MethodConfigError(f"{where}: 'modules' must be a list, got {type(modules_raw).__name__}")
    train_base = choice_value(raw.get("train_base", "none"), TRAIN_BASE, f"{where}: train_base")
    train_head = expect_value(raw.get("train_head", True), bool, f"{where}: train_head")
    train_modules = names_value(raw.get("train_modules", []), f"{where}: train_modules")
    modules = []
    for index, module_raw in enumerate(modules_raw):
        modules.append(_build_module(module_raw, f"{where} module {index}", index))
    names = [m.name for m in modules]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise MethodConfigError(f"{where}: module name '{duplicate}' is used twice; names must be unique")
    for form in FORMS.values():
        if form.once_per_method and sum(m.form == form.name for m in modules) > 1:
            raise MethodConfigError(f"{where}: more than one '{form.name}' module; {form.once_per_method}")
    if not modules and train_base == "none":
        raise MethodConfigError(f"{where}: no modules and train_base 'none' leaves nothing to train")
    budget = budget_value(raw.get("budget"), f"{where}: budget")
    _check_shares(modules, where)
    quantize = choice_value(raw.get("quantize", "none"), QUANTIZE, f"{where}: quantize")
    compute_dtype = choice_value(raw.get("compute_dtype", "bfloat16"), COMPUTE_DTYPES, f"{where}: compute_dtype")
    double_quant = expect_value(raw.get("double_quant", True), bool, f"{where}: double_quant")
    optimizer = raw.get("optimizer")
    optimizer = None if optimizer is None else choice_value(optimizer, OPTIMIZERS, f"{where}: optimizer")
    if quantize != "none" and train_base != "none":
        raise MethodConfigError(f"{where}: quantize '{quantize}' freezes the base; train_base must be 'none'")
    if budget is not None and not modules:
        raise MethodConfigError(f"{where}: budget {budget!r} needs a module with a size to solve; this method has none")
    return MethodSpec(name=name, modules=tuple(modules), train_base=train_base, train_head=train_head,
                      train_modules=train_modules, budget=budget,
                      quantize=quantize, compute_dtype=compute_dtype, double_quant=double_quant, optimizer=optimizer)


def _build_module(raw: Any, where: str, index: int) -> ModuleSpec:
    raw = _to_container(raw)
    if not isinstance(raw, Mapping):
        raise MethodConfigError(f"{where}: expected a mapping of module options, got {type(raw).__name__}")
    raw = dict(raw)
    if "form" not in raw:
        raise MethodConfigError(f"{where}: missing key 'form' (allowed: {allowed(FORMS)})")
    form = FORMS[choice_value(raw["form"], tuple(FORMS), f"{where}: form")]
    keys = module_keys(form)
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise MethodConfigError(
            f"{where}: unknown key '{unknown[0]}' for form '{form.name}' (allowed: {allowed(sorted(keys))})"
        )
    for key in ("at", "insertion", "compose"):
        if key not in raw:
            raise MethodConfigError(f"{where}: missing key '{key}'")
    at_raw = raw["at"] if isinstance(raw["at"], (list, tuple)) else [raw["at"]]
    if not at_raw:
        raise MethodConfigError(f"{where}: 'at' is empty (allowed: {allowed(SITES)})")
    at = tuple(choice_value(site, ALL_AT, f"{where}: at") for site in no_repeats(at_raw, f"{where}: at"))
    insertion = choice_value(raw["insertion"], INSERTIONS, f"{where}: insertion")
    compose = choice_value(raw["compose"], COMPOSITIONS, f"{where}: compose")
    values: dict[str, Any] = {"form": form.name, "at": at, "insertion": insertion, "compose": compose}
    values["name"] = expect_value(raw.get("name", f"m{index}"), str, f"{where}: name")
    if not values["name"].isidentifier():
        raise MethodConfigError(f"{where}: name '{values['name']}' must be a Python identifier")

    _check_combination(form, at, insertion, compose, where)
    values["scale"] = scale_value(raw, compose, where)
    values["layers"] = layers_value(raw.get("layers", "all"), where)
    stacks = raw.get("stacks", list(STACKS))
    stacks = stacks if isinstance(stacks, (list, tuple)) else [stacks]
    values["stacks"] = tuple(choice_value(s, STACKS, f"{where}: stacks")
                             for s in no_repeats(stacks, f"{where}: stacks"))
    if not values["stacks"]:
        raise MethodConfigError(f"{where}: 'stacks' is empty (allowed: {allowed(STACKS)})")
    lr = raw.get("lr")
    values["lr"] = None if lr is None else positive_float_value(lr, f"{where}: lr")
    share = raw.get("budget_share")
    values["budget_share"] = None if share is None else probability_value(share, f"{where}: budget_share")
    if share is not None and values["budget_share"] <= 0:
        raise MethodConfigError(f"{where}: budget_share must be in (0, 1), got {share!r}")
    options = form.parse({k: v for k, v in raw.items() if k in form.option_names()}, where)
    return form.finish_module(ModuleSpec(**values, options=options), raw, where)


def _check_shares(modules: list[ModuleSpec], where: str) -> None:
    shared = [m for m in modules if m.budget_share is not None]
    if shared and len(shared) != len(modules):
        missing = next(m.name for m in modules if m.budget_share is None)
        raise MethodConfigError(f"{where}: module '{missing}' has no budget_share; give every module one or none")
    total = sum(m.budget_share for m in shared)
    if total > 1 + 1e-9:
        raise MethodConfigError(f"{where}: budget_share values sum to {total:g}, more than the whole budget (1)")


def _check_combination(form: Form, at: tuple[str, ...], insertion: str, compose: str, where: str) -> None:
    for site in at:
        if site not in form.sites:
            raise MethodConfigError(
                f"{where}: form '{form.name}' cannot act at '{site}' (allowed at: {allowed(form.sites)})"
            )
    if any(site in NORM_SITES for site in at) and insertion != "sequential":
        raise MethodConfigError(f"{where}: site 'ffn.ln' reads LN(h + residual), the sub-layer's normalised output: "
                                f"use insertion 'sequential' (got '{insertion}')")
    if insertion not in form.insertions:
        raise MethodConfigError(
            f"{where}: form '{form.name}' cannot use insertion '{insertion}' "
            f"(allowed insertion: {allowed(form.insertions)})"
        )
    if compose not in form.compositions:
        raise MethodConfigError(
            f"{where}: form '{form.name}' cannot use compose '{compose}' "
            f"(allowed compose: {allowed(form.compositions)})"
        )


__all__ = ["ALL_LINEAR", "MethodSpec", "ModuleSpec", "PROJECTION_SITES", "list_presets", "load_method",
           "module_keys"]
