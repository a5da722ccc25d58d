"""Method specs: immutable, validated descriptions of a PEFT method as modules on He et al.'s four axes.

A method is a list of modules; each module fixes a functional form (`form`), the representation it modifies
(`at`), what it reads (`insertion`) and how its output meets the hidden state (`compose`), plus the form's own
options. Everything is checked here, before any model is touched: unknown keys, wrong types, unknown values
and combinations that cannot work raise MethodConfigError with one line naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import MethodConfigError, allowed, read_utf8
from .prompt_grammar import PROMPT_KEYS, prompt_options, template_to_yaml
from .spec_values import (
    budget_value,
    choice_value,
    expect_value,
    layers_value,
    load_yaml,
    names_value,
    no_repeats,
    positive_float_value,
    positive_int_value,
    probability_value,
    scale_value,
    svd_options,
)

FORMS = ("bottleneck", "prefix", "svd", "prompt")
INSERTIONS = ("sequential", "parallel")
COMPOSITIONS = ("add", "scale", "gate", "sigmoid_gate")
ACTIVATIONS = ("relu", "gelu", "tanh", "silu", "none")
INITS = ("bert", "lora", "lora_gaussian", "near_identity")
LAYERNORMS = ("none", "in", "out")
STACKS = ("encoder", "decoder")
TRAIN_BASE = ("none", "all", "bias", "layernorm")

ATTN_SITES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn", "attn.heads")
CROSS_SITES = tuple(s.replace("attn", "cross_attn", 1) for s in ATTN_SITES)
FFN_SITES = ("ffn.up", "ffn.gate", "ffn.down", "ffn")
# AdapterHub's Pfeiffer placement (UniPELT's adapter uses it): post-LN layers (BERT, BART): Δ reads LN(h + residual)
# and is added before that LayerNorm, which is applied again; pre-LN layers: Δ reads h + residual and is added to it.
NORM_SITES = ("ffn.ln",)
SITES = ATTN_SITES + CROSS_SITES + FFN_SITES + NORM_SITES
HEAD_SITES = ("attn.heads", "cross_attn.heads")
# Projection sites are single linear maps, so a linear parallel module there can be folded into the weight.
PROJECTION_SITES = tuple(s for s in SITES if s.count(".") == 1 and not s.endswith(".heads") and s not in NORM_SITES)
# The input sequence itself: where prompt tuning / P-tuning put their virtual tokens.
INPUT_SITES = ("embeddings",)
# `at: all_linear` (QLoRA's "all linear layers"): every projection site the model has, expanded per model.
ALL_LINEAR = "all_linear"
QUANTIZE = ("none", "nf4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# Optimizer names a trainer reads from `method.optimizer` (QLoRA: paged 8-bit AdamW through bitsandbytes).
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


@dataclass(frozen=True)
class ModuleSpec:
    """One modification Δh: a point on the four axes plus the functional form's options."""

    form: str
    at: tuple[str, ...]
    insertion: str
    compose: str
    name: str = ""
    scale: float | str = 1.0  # a fixed factor, or "learned" (a trainable scalar starting at 1)
    layers: str | tuple[int, ...] = "all"
    stacks: tuple[str, ...] = STACKS
    lr: float | None = None  # this module's own learning rate (e.g. prefix vs adapter); None: the trainer's
    # under method.budget: this module's fraction of the budget, its size solved alone (He et al. size MAM's prefix
    # and adapter separately); None: sizes scale together in the spec's ratio (unipelt.budget)
    budget_share: float | None = None
    # bottleneck
    dim: int = 64
    activation: str = "relu"
    init: str = "bert"
    layernorm: str = "none"
    dropout: float = 0.0
    bias: bool | None = None  # None: on for adapters, off for LoRA-style inits (the papers' choices)
    reduction_factor: int | None = None  # bottleneck width d / reduction_factor (AdapterHub's; overrides dim)
    # prefix
    length: int = 30
    mlp_dim: int | None = None
    # sigmoid_gate on a prefix: "kv" multiplies P_K and P_V by the gate (Mao et al.'s code); "delta" scales the
    # prefix's whole change to the attention output (g = 0: base attention exactly; our earlier variant)
    prefix_gate: str = "kv"
    # softmax: the prefix joins the attention (gate) or is attended apart (add / scale); relu: He et al.'s
    # multi-head parallel adapter (attn_option cross_attn_relu): the query q_proj(LN(x)) with a new LayerNorm,
    # ReLU(q·P_kᵀ)·P_v per head, unscaled, beside the attention (compose add / scale)
    score: str = "softmax"
    # prompt (prompt tuning / P-tuning; `length` above is the number of virtual tokens): see prompt_grammar.py
    init_text: str | tuple[int, ...] | None = None
    encoder: str = "none"
    encoder_dim: int | None = None
    template: tuple | None = None  # None: every virtual token before the input
    # svd (AdaLoRA, Zhang et al. 2023): ranks, budget schedule (steps, or fractions of the run when < 1),
    # importance smoothing, orthogonal-regulariser weight; rank_pattern holds the pruned ranks of a saved adapter
    init_r: int = 12
    target_r: int = 8
    tinit: int | float = 0.1
    tfinal: int | float = 0.5
    delta_t: int = 100
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    rank_pattern: tuple[tuple[str, int], ...] | None = None
    alpha: float | None = None  # svd: the scale is alpha / init_r (the reference's lora_alpha / ranknum)

    @property
    def has_bias(self) -> bool:
        if self.bias is not None:
            return self.bias
        return self.init not in ("lora", "lora_gaussian")

    @property
    def is_linear(self) -> bool:
        """True when Δh is a linear map of the input, so it can be folded into a projection weight."""
        if self.form == "svd":
            return self.compose in ("add", "scale")
        return (
            self.form == "bottleneck"
            and self.activation == "none"
            and self.layernorm == "none"
            and self.compose in ("add", "scale")
        )


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
        out["modules"] = []
        for module in self.modules:
            entry = {k: v for k, v in dataclasses.asdict(module).items() if k in FORM_KEYS[module.form]}
            entry["at"] = list(module.at)
            if "stacks" in FORM_KEYS[module.form]:
                entry["stacks"] = list(module.stacks)
            if module.form == "prompt":
                _prompt_entry(entry)
            if isinstance(module.layers, tuple):
                entry["layers"] = list(module.layers)
            if module.compose != "scale":
                entry.pop("scale", None)
            if entry.get("alpha") is not None:
                entry.pop("scale", None)  # alpha / init_r gives it back
            for optional in ("bias", "lr", "rank_pattern", "budget_share", "alpha", "reduction_factor"):
                if entry.get(optional, False) is None:
                    entry.pop(optional)
            if entry.get("rank_pattern") is not None:
                entry["rank_pattern"] = dict(entry["rank_pattern"])
            out["modules"].append(entry)
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
        """The same method with prefix reparameterisation MLPs folded away (what is saved and served)."""
        modules = tuple(dataclasses.replace(m, mlp_dim=None) if m.form == "prefix" else m for m in self.modules)
        # A P-tuning encoder is folded into the plain vectors it produces, as a prefix MLP is.
        modules = tuple(dataclasses.replace(m, encoder="none", encoder_dim=None) if m.form == "prompt" else m
                        for m in modules)
        return dataclasses.replace(self, modules=modules)

    def replace_module(self, index: int, **changes: Any) -> "MethodSpec":
        modules = list(self.modules)
        modules[index] = dataclasses.replace(modules[index], **changes)
        return dataclasses.replace(self, modules=tuple(modules))


_COMMON_KEYS = {"form", "at", "insertion", "compose", "name", "scale", "layers", "stacks", "lr", "budget_share"}
FORM_KEYS = {
    "bottleneck": _COMMON_KEYS | {"dim", "activation", "init", "layernorm", "dropout", "bias", "reduction_factor"},
    "prefix": _COMMON_KEYS | {"length", "mlp_dim", "prefix_gate", "score"},
    "prompt": (_COMMON_KEYS - {"layers", "stacks", "scale"}) | PROMPT_KEYS,
    "svd": _COMMON_KEYS | {"init_r", "target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight",
                           "rank_pattern", "alpha"},
}
METHOD_KEYS = ("name", "modules", "train_base", "train_head", "train_modules", "budget", "quantize", "compute_dtype", "double_quant",
               "optimizer")
# What each form can do on each axis; anything else is a combination that cannot work.
FORM_SITES = {"bottleneck": SITES + (ALL_LINEAR,), "prefix": HEAD_SITES, "svd": PROJECTION_SITES + (ALL_LINEAR,),
              "prompt": INPUT_SITES}
# A prompt is computed from nothing in the model (parallel) and meets h through attention (gate).
FORM_INSERTIONS = {"bottleneck": INSERTIONS, "prefix": ("parallel",), "svd": ("parallel",), "prompt": ("parallel",)}
FORM_COMPOSITIONS = {"bottleneck": ("add", "scale", "sigmoid_gate"), "prefix": ("gate", "add", "scale", "sigmoid_gate"),
                     "svd": ("add", "scale"), "prompt": ("gate",)}


def preset_dir() -> Path:
    return Path(str(resources.files("unipelt.conf") / "method"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


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
    text = str(source)
    if text.endswith((".yaml", ".yml")) or "/" in text or isinstance(source, Path):
        path = Path(text)
        if not path.is_file():
            raise MethodConfigError(f"method file not found: {path}")
        return path
    path = preset_dir() / f"{text}.yaml"
    if not path.is_file():
        raise MethodConfigError(f"unknown method preset '{text}' (allowed: {allowed(list_presets())})")
    return path


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
    if sum(m.form == "prompt" for m in modules) > 1:  # one input sequence: all virtual tokens go in one template
        raise MethodConfigError(f"{where}: more than one 'prompt' module; put all virtual tokens in one template")
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
    form = choice_value(raw["form"], FORMS, f"{where}: form")
    unknown = sorted(set(raw) - FORM_KEYS[form])
    if unknown:
        raise MethodConfigError(
            f"{where}: unknown key '{unknown[0]}' for form '{form}' (allowed: {allowed(sorted(FORM_KEYS[form]))})"
        )
    for key in ("at", "insertion", "compose"):
        if key not in raw:
            raise MethodConfigError(f"{where}: missing key '{key}'")
    at_raw = raw["at"] if isinstance(raw["at"], (list, tuple)) else [raw["at"]]
    if not at_raw:
        raise MethodConfigError(f"{where}: 'at' is empty (allowed: {allowed(SITES)})")
    at = tuple(choice_value(site, SITES + INPUT_SITES + (ALL_LINEAR,), f"{where}: at")
               for site in no_repeats(at_raw, f"{where}: at"))
    insertion = choice_value(raw["insertion"], INSERTIONS, f"{where}: insertion")
    compose = choice_value(raw["compose"], COMPOSITIONS, f"{where}: compose")
    values: dict[str, Any] = {"form": form, "at": at, "insertion": insertion, "compose": compose}
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
    if form == "prompt":
        values.update(prompt_options(raw, where))
        return ModuleSpec(**values)
    if form == "svd":
        values.update(svd_options(raw, where))
        if values["alpha"] is not None:
            if "scale" in raw or compose != "scale":
                raise MethodConfigError(f"{where}: alpha sets the scale (alpha / init_r): use it with compose "
                                        f"'scale' and without 'scale'")
            values["scale"] = values["alpha"] / values["init_r"]
        return ModuleSpec(**values)

    if form == "bottleneck":
        values["dim"] = positive_int_value(raw.get("dim", 64), f"{where}: dim")
        values["activation"] = choice_value(raw.get("activation", "relu"), ACTIVATIONS, f"{where}: activation")
        values["init"] = choice_value(raw.get("init", "bert"), INITS, f"{where}: init")
        values["layernorm"] = choice_value(raw.get("layernorm", "none"), LAYERNORMS, f"{where}: layernorm")
        values["dropout"] = probability_value(raw.get("dropout", 0.0), f"{where}: dropout")
        bias = raw.get("bias")
        values["bias"] = None if bias is None else expect_value(bias, bool, f"{where}: bias")
        factor = raw.get("reduction_factor")
        values["reduction_factor"] = None if factor is None else positive_int_value(factor, f"{where}: reduction_factor")
    else:
        values["length"] = positive_int_value(raw.get("length", 30), f"{where}: length")
        mlp_dim = raw.get("mlp_dim")
        values["mlp_dim"] = None if mlp_dim is None else positive_int_value(mlp_dim, f"{where}: mlp_dim")
        values["prefix_gate"] = choice_value(raw.get("prefix_gate", "kv"), ("kv", "delta"), f"{where}: prefix_gate")
        values["score"] = choice_value(raw.get("score", "softmax"), ("softmax", "relu"), f"{where}: score")
        if values["score"] == "relu" and compose not in ("add", "scale"):
            raise MethodConfigError(f"{where}: score 'relu' (attended beside the attention) needs compose 'add' or "
                                    f"'scale', got '{compose}'")
    return ModuleSpec(**values)


def _check_shares(modules: list[ModuleSpec], where: str) -> None:
    shared = [m for m in modules if m.budget_share is not None]
    if shared and len(shared) != len(modules):
        missing = next(m.name for m in modules if m.budget_share is None)
        raise MethodConfigError(f"{where}: module '{missing}' has no budget_share; give every module one or none")
    total = sum(m.budget_share for m in shared)
    if total > 1 + 1e-9:
        raise MethodConfigError(f"{where}: budget_share values sum to {total:g}, more than the whole budget (1)")


def _prompt_entry(entry: dict[str, Any]) -> None:
    """YAML form of a prompt module's own keys (in place): lists for token ids and the template, no nulls."""
    for key in ("init_text", "encoder_dim", "template"):
        if entry.get(key) is None:
            entry.pop(key, None)
    if isinstance(entry.get("init_text"), tuple):
        entry["init_text"] = list(entry["init_text"])
    if "template" in entry:
        entry["template"] = template_to_yaml(entry["template"])


def _check_combination(form: str, at: tuple[str, ...], insertion: str, compose: str, where: str) -> None:
    for site in at:
        if site not in FORM_SITES[form]:
            raise MethodConfigError(
                f"{where}: form '{form}' cannot act at '{site}' (allowed at: {allowed(FORM_SITES[form])})"
            )
    if any(site in NORM_SITES for site in at) and insertion != "sequential":
        raise MethodConfigError(f"{where}: site 'ffn.ln' reads LN(h + residual), the sub-layer's normalised output: "
                                f"use insertion 'sequential' (got '{insertion}')")
    if insertion not in FORM_INSERTIONS[form]:
        raise MethodConfigError(
            f"{where}: form '{form}' cannot use insertion '{insertion}' "
            f"(allowed insertion: {allowed(FORM_INSERTIONS[form])})"
        )
    if compose not in FORM_COMPOSITIONS[form]:
        raise MethodConfigError(
            f"{where}: form '{form}' cannot use compose '{compose}' "
            f"(allowed compose: {allowed(FORM_COMPOSITIONS[form])})"
        )


__all__ = ["ModuleSpec", "MethodSpec", "load_method", "list_presets"]
