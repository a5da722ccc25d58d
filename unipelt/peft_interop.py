"""export_peft / import_peft: LoRA-type adapters <-> Hugging Face PEFT's `adapter_config.json` +
`adapter_model.safetensors`, with identical outputs both ways. PEFT itself is not needed at run time.

PEFT's LoRA computes h + s·B·A·dropout(x) on a projection, s = lora_alpha / r (or / sqrt(r) with rslora). The
unipelt modules that say exactly this are parallel bottlenecks with no activation, no LayerNorm and no bias at a
projection site, composed by add (s = 1) or scale (a fixed or learned s); A is `down.weight`, B is `up.weight`.
AdaLoRA's svd form P·diag(λ)·Q exports the same way with A = diag(λ)·Q and B = P, pruned triplets dropped (so
ranks differ per module: rank_pattern); outputs agree up to float rounding (λ is multiplied in first).

Export writes lora_alpha = s·r, so PEFT's scaling is s. Per-module ranks and scales go to rank_pattern /
alpha_pattern (keys are full module names), the trained task head to modules_to_save. A fused projection
that unipelt modifies chunk by chunk (GPT-2's c_attn: attn.q / attn.k / attn.v) becomes one PEFT LoRA on the
fused module whose rank is the sum of the chunks' ranks: A stacks the chunks' A matrices, B is block-diagonal
(each chunk's B, times its scale, in its own output rows; zeros elsewhere) and lora_alpha = rank, so s = 1.
That is the same map, so outputs are identical; in PEFT the zero blocks of B would train, too. Two modules on the
same projection (a hybrid) are written the same way: one LoRA of the summed rank.

Import maps PEFT's target_modules (PEFT's own matching rule: a full-match regex, or a name equal to or ending in
`.<target>`) to unipelt sites, attaches one module per (stack, rank, scale, layer set) and copies the weights;
a LoRA on a fused module becomes one module per chunk (A shared by copy, B split by rows). Options that change
the computation and have no exact unipelt equivalent (DoRA, LoRA bias, other variants, ...) are refused;
layers_to_transform / layers_pattern / exclude_modules follow PEFT's own matching rules.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import compat
from .adapter_set import apply
from .attach import adapter_set, attach_method, check_model, detach, is_attached, state_of
from .errors import AdapterFileError
from .io import atomic_write, make_directory, non_finite_tensor, owned_value, read_json, read_tensors
from .peft_names import layer_index, name_matches, pattern_value, target_suffixes
from .placement import base_path, projection_index
from .sites import family_of, is_transposed, linear_dims
from .sites.names import PROJECTION_SITES
from .slot import Slot, chunk_rows
from .forms import FORMS, Form, PeftLora, form_of
from .spec import load_method

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
# PEFT LoRA options that change the computation (LoRA variants, extra trained tensors, replicated layers), with
# PEFT's defaults; import refuses a file that sets any of them, except those a form declares it reads
# (Form.peft_lora_reads, e.g. use_dora), which choose the form instead. Layer filters, exclude_modules and rslora are handled exactly; init-only
# options (init_lora_weights, loftq, eva, corda...) do not matter for loading.
UNSUPPORTED = {
    "use_dora": False, "lora_bias": False, "bias": "none", "target_parameters": None,
    "trainable_token_indices": None, "layer_replication": None, "alora_invocation_tokens": None,
    "use_qalora": False, "use_bdlora": None, "modules_to_tie": None, "arrow_config": None, "kasa_config": None,
    "monteclora_config": None, "velora_config": None,
}
FORWARD_CHANGING_INITS = ("mica",)  # init_lora_weights values that select a LoRA variant
# Head names PEFT adds to modules_to_save by itself for a task_type (whichever head the model has); import skips the
# ones this model lacks when the file holds no tensor of theirs.
PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                   "QUESTION_ANS": ("qa_outputs",)}


# ---- export ---------------------------------------------------------------------------------------------------

def _as_lora(slot: Slot) -> PeftLora | str:
    """The slot as PEFT's LoRA (or why not): the slot's form says (Form.peft_lora_export)."""
    return form_of(slot.spec.form).peft_lora_export(slot)


@compat.accepts_compiled
def export_peft(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Write an attached LoRA-type adapter (`name`; default the only or the active one) as a PEFT LoRA adapter;
    refuses (one line) what PEFT LoRA cannot say."""
    config, tensors = peft_lora_state(model, name, "export_peft")
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    bad = non_finite_tensor(cpu)
    if bad is not None:
        raise AdapterFileError(f"export_peft: tensor {bad} holds non-finite values; nothing written")
    out = make_directory(directory, "export_peft")
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(cpu, str(p), metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    return out


def peft_lora_state(model: nn.Module, name: str | None, caller: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter as PEFT's LoRA config and tensors (what export_peft writes), or one line saying why it has
    none."""
    state = state_of(model, name, caller)
    if state.merged:
        raise AdapterFileError(f"{caller}: modules are merged into the weights; call unipelt.unmerge first")
    if state.method.train_base != "none":
        raise AdapterFileError(f"{caller}: train_base '{state.method.train_base}' has no PEFT LoRA equivalent")
    groups: dict[str, list[tuple[Any, PeftLora]]] = {}
    variant: dict[str, Any] = {}  # LoraConfig values the modules need (a LoRA variant's flag); all must agree
    for placement in state.placements:
        slot = state.slots[f"{placement.host_name}.{placement.slot_name}"]
        lora = _as_lora(slot)
        if isinstance(lora, str):
            raise AdapterFileError(
                f"{caller}: module '{placement.spec.name}' at '{placement.site}' cannot be expressed as PEFT LoRA: "
                f"{lora}"
            )
        for key, value in lora.config.items():
            if variant.setdefault(key, value) != value:
                raise AdapterFileError(f"{caller}: modules need different {key} values ({variant[key]!r} and "
                                       f"{value!r}); one PEFT file has one")
        groups.setdefault(placement.h_name, []).append((placement, lora))
    dropouts = sorted({getattr(p.spec, "dropout", 0.0) for group in groups.values() for p, _ in group})
    if len(dropouts) > 1:
        raise AdapterFileError(
            f"{caller}: modules use different dropouts {dropouts}; PEFT LoRA has one lora_dropout"
        )

    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, group in groups.items():
        host = modules[name]
        if sum(lora.a.shape[0] for _, lora in group) == 0:
            continue  # every triplet pruned: this projection is not modified
        if len(group) == 1 and group[0][0].chunk is None:
            lora = group[0][1]
            a, b = lora.a, lora.b
            ranks[name], alphas[name] = a.shape[0], lora.scale * a.shape[0]
            tensors.update({f"{KEY_PREFIX}{name}.{suffix}": t for suffix, t in lora.tensors.items()})
        else:  # chunks of a fused projection, or several modules on one projection: stacked A, block B with
            # each module's B (times its scale) in its own output rows (a chunk's, or all) and its own columns
            placement, lora = next(((p, lo) for p, lo in group if not lo.stackable), (None, None))
            if lora is not None:
                raise AdapterFileError(f"{caller}: module '{placement.spec.name}' at '{placement.site}' shares "
                                       f"projection '{name}' with other modules or chunks, which its PEFT LoRA "
                                       "variant cannot be stacked with")
            out_features = linear_dims(host, name)[1]
            a = torch.cat([lora.a for _, lora in group])
            b = torch.zeros(out_features, a.shape[0], dtype=a.dtype, device=a.device)
            column = 0
            for placement, lora in group:
                rows = chunk_rows(placement.chunk, out_features)
                b[rows, column:column + lora.a.shape[0]] = lora.b * lora.scale
                column += lora.a.shape[0]
            ranks[name], alphas[name] = a.shape[0], float(a.shape[0])
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b

    head_modules = sorted({n.rpartition(".")[0] for n in state.trained_head})
    for name in state.trained_head:
        tensors[f"{KEY_PREFIX}{name}"] = owned_value(model, state, name)
    if not ranks:
        raise AdapterFileError(
            f"{caller}: method '{state.method.name}' has every rank pruned to 0; nothing to export"
        )
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": compat.name_or_path(model.config) or None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropouts[0] if dropouts else 0.0,
        "target_modules": target_suffixes(set(ranks), list(modules)),
        "rank_pattern": {n: r for n, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {n: a for n, a in sorted(alphas.items()) if a != alpha},
        "modules_to_save": head_modules or None,
        "fan_in_fan_out": any(is_transposed(modules[n]) for n in ranks),
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        **variant,
    }
    return config, tensors


# ---- import ---------------------------------------------------------------------------------------------------

def _targeted(config: dict[str, Any], names: list[str]) -> list[str]:
    targets = config.get("target_modules")
    if targets == "all-linear":
        raise AdapterFileError("import_peft: target_modules 'all-linear' is not supported; list the module names")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets)):
        raise AdapterFileError(f"import_peft: target_modules must be a list of names or a regex, got {targets!r}")
    exclude = config.get("exclude_modules") or []
    layers = config.get("layers_to_transform")
    chosen = []
    for name in names:
        if name_matches(exclude, name) or not name_matches(targets, name):
            continue
        if layers not in (None, []):
            index = layer_index(name, config.get("layers_pattern"))
            if index is None or (index != layers if isinstance(layers, int) else index not in layers):
                continue
        chosen.append(name)
    return chosen


def read_peft(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    src = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise AdapterFileError(f"import_peft: {src / name} not found")
    config = read_json(src / CONFIG_FILE, "import_peft")
    if not isinstance(config, dict):
        raise AdapterFileError(f"import_peft: {src / CONFIG_FILE} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"import_peft: peft_type {config.get('peft_type')!r} is not supported (allowed: LORA)")
    _check_shapes_of_values(config)
    read_by_forms = {key for form in FORMS.values() for key in (form.peft_lora_reads or {})}
    for key, default in UNSUPPORTED.items():
        if key in read_by_forms:
            continue  # a LoRA variant that a form reads (DoRA's use_dora): the form is chosen by it below
        if config.get(key, default) not in (default, None, False, [], {}):
            raise AdapterFileError(
                f"import_peft: {key}={config[key]!r} has no exact unipelt equivalent (supported: {key}={default!r})"
            )
    if config.get("init_lora_weights") in FORWARD_CHANGING_INITS:
        raise AdapterFileError(
            f"import_peft: init_lora_weights={config['init_lora_weights']!r} selects a LoRA variant with no exact "
            "unipelt equivalent"
        )
    tensors = read_tensors(src / WEIGHTS_FILE, "import_peft")
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise AdapterFileError(f"import_peft: tensor {bad} in {src / WEIGHTS_FILE} holds non-finite values")
    return config, tensors


def _check_shapes_of_values(config: dict[str, Any]) -> None:
    """Ranks are positive integers and alphas finite numbers (PEFT's own files always are; a hand-edited one may
    not be: r=2.5 would be cut to 2 and r=0 divide by zero)."""
    def refuse(key: str, value: Any, wanted: str) -> None:
        raise AdapterFileError(f"import_peft: {key} must be {wanted}, got {value!r}")

    def is_rank(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def is_alpha(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key, check, wanted in (("r", is_rank, "a positive integer"), ("lora_alpha", is_alpha, "a finite number")):
        if key in config and not check(config[key]):
            refuse(key, config[key], wanted)
    for key, check, wanted in (("rank_pattern", is_rank, "a positive integer"),
                               ("alpha_pattern", is_alpha, "a finite number")):
        for name, value in (config.get(key) or {}).items():
            if not check(value):
                refuse(f"{key}['{name}']", value, wanted)
    layers = config.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        refuse("layers_to_transform", layers, "a layer index or a list of them")
    if isinstance(config.get("modules_to_save"), str):  # PEFT accepts one name as a string
        config["modules_to_save"] = [config["modules_to_save"]]


def _reading_form(config: dict[str, Any]) -> Form:
    """The form that reads this file: the first whose declared LoraConfig values (Form.peft_lora_reads) it has."""
    for form in FORMS.values():
        reads = form.peft_lora_reads
        if reads is not None and all(config.get(k, UNSUPPORTED.get(k)) == v for k, v in reads.items()):
            return form
    keys = sorted({k for form in FORMS.values() for k in (form.peft_lora_reads or {})})
    found = ", ".join(f"{k}={config.get(k, UNSUPPORTED.get(k))!r}" for k in keys)
    raise AdapterFileError(f"import_peft: no unipelt form reads a PEFT LoRA with {found}")


def _lora_layout(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], form: Form):
    """Check every tensor against the model; return {module name: PeftLora} and the head tensors."""
    modules = dict(model.named_modules())
    index = projection_index(model)
    targets = _targeted(config, list(modules))
    if not targets:
        raise AdapterFileError(f"import_peft: target_modules {config.get('target_modules')!r} match no module here")
    rslora = bool(config.get("use_rslora", False))
    layout, ranks = {}, {}
    for name in targets:
        if name not in index:
            raise AdapterFileError(
                f"import_peft: target module '{name}' ({type(modules[name]).__name__}) is not a projection site "
                "unipelt can modify"
            )
        rank = int(pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8)))
        alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank  # PEFT's expressions, for identical floats
        d_in, d_out = linear_dims(modules[name], name)
        pair = []
        for part, shape in (("lora_A", (rank, d_in)), ("lora_B", (d_out, rank))):
            key = f"{KEY_PREFIX}{name}.{part}.weight"
            if key not in tensors:
                raise AdapterFileError(f"import_peft: tensor '{key}' missing in {WEIGHTS_FILE}")
            if tuple(tensors[key].shape) != shape:
                raise AdapterFileError(
                    f"import_peft: tensor '{key}' has shape {tuple(tensors[key].shape)} in the file, "
                    f"{shape} for r={rank}"
                )
            pair.append(tensors[key])
        extra = {}
        for suffix in form.peft_lora_tensors:
            key = f"{KEY_PREFIX}{name}.{suffix}"
            if key not in tensors:
                raise AdapterFileError(f"import_peft: tensor '{key}' missing in {WEIGHTS_FILE}")
            extra[suffix] = tensors[key]
        layout[name] = PeftLora(a=pair[0], b=pair[1], scale=scale, tensors=extra)
        ranks[name] = rank
    # modules_to_save (the trained task head): PEFT's name rule again; every parameter under a matched module
    params = dict(model.named_parameters())
    heads = list(config.get("modules_to_save") or [])
    head_params: dict[str, str] = {}  # parameter name -> the modules_to_save entry it belongs to
    auto_heads = PEFT_TASK_HEADS.get(str(config.get("task_type")), ())
    for head in heads:
        matched = [m for m in modules if m and (m == head or m.endswith(f".{head}"))]
        if not matched:
            in_file = any(k.startswith(f"{KEY_PREFIX}{head}.") or f".{head}." in k for k in tensors)
            if head in auto_heads and not in_file:
                continue  # PEFT lists every head its task type may use; this model has another one
            raise AdapterFileError(f"import_peft: modules_to_save '{head}' matches no module here")
        head_params.update({n: head for n in params if any(n.startswith(f"{m}.") for m in matched)})
    used = {f"{KEY_PREFIX}{n}.{p}.weight" for n in layout for p in ("lora_A", "lora_B")}
    used |= {f"{KEY_PREFIX}{n}.{suffix}" for n in layout for suffix in form.peft_lora_tensors}
    head_tensors = {}
    for key, tensor in tensors.items():
        if key in used:
            continue
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        if name not in head_params:
            raise AdapterFileError(f"import_peft: unexpected tensor '{key}' (not a LoRA weight of a target module "
                                   f"nor a parameter of modules_to_save {heads})")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise AdapterFileError(f"import_peft: tensor '{key}' has shape {tuple(tensor.shape)} in the file, "
                                   f"{tuple(params[name].shape)} in the model")
        head_tensors[name] = tensor
    missing = sorted(set(head_params) - set(head_tensors))
    if missing:
        raise AdapterFileError(f"import_peft: tensor '{KEY_PREFIX}{missing[0]}' of modules_to_save "
                               f"'{head_params[missing[0]]}' missing in {WEIGHTS_FILE}")
    return layout, ranks, head_tensors, index


def _method(model: nn.Module, layout: dict, ranks: dict, index: dict, dropout: float, form: Form) -> dict[str, Any]:
    """One unipelt module per (stack, rank, scale, layer set), covering the sites that share them."""
    family = family_of(model.config)
    modules = dict(model.named_modules())
    root = base_path(model)
    groups: dict[tuple, dict[str, set[int]]] = {}
    for name, lora in layout.items():
        for stack, layer, site, _ in index[name]:
            groups.setdefault((stack, ranks[name], lora.scale), {}).setdefault(site, set()).add(layer)
    entries = []
    for (stack, rank, scale), sites in groups.items():
        n_layers = len(modules[".".join(p for p in (root, family.stacks[stack].path) if p)])
        by_layers: dict[tuple[int, ...], list[str]] = {}
        for site, layers in sites.items():
            by_layers.setdefault(tuple(sorted(layers)), []).append(site)
        for layers, at in by_layers.items():
            entries.append({
                **form.peft_lora_module(rank, scale, dropout), "name": f"lora{len(entries)}", "at": sorted(at),
                "stacks": [stack], "layers": "all" if layers == tuple(range(n_layers)) else list(layers),
            })
    return {"name": "peft_lora", "modules": entries}


@compat.accepts_compiled
def import_peft(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Attach a PEFT LoRA adapter as unipelt modules with identical outputs, as the adapter `name` (default
    "default"), made active; on any error the model is unchanged."""
    name = check_model(model, "import_peft", name)
    config, tensors = read_peft(directory)
    return attach_peft_state(model, config, tensors, name, "import_peft")


def attach_peft_state(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str,
                      caller: str) -> nn.Module:
    """Attach a checked PEFT LoRA config and its tensors as the adapter `name` (import_peft's second half)."""
    form = _reading_form(config)
    layout, ranks, head_tensors, index = _lora_layout(model, config, tensors, form)
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    method = load_method(_method(model, layout, ranks, index, dropout, form))
    previous = adapter_set(model).active if is_attached(model) else None
    attach_method(model, method, name)
    try:
        state = state_of(model, name)
        with torch.no_grad():
            for placement in state.placements:
                slot = state.slots[f"{placement.host_name}.{placement.slot_name}"]
                form.peft_lora_load(slot, layout[placement.h_name], placement.chunk)
            for pname, tensor in head_tensors.items():
                owned_value(model, state, pname).copy_(tensor)
        loaded = {f"{n}.{k}": v for n, slot in state.slots.items() for k, v in slot.named_parameters()}
        loaded.update({p: owned_value(model, state, p) for p in head_tensors})
        bad = non_finite_tensor(loaded)
        if bad is not None:  # the file's values are finite (read_peft) but overflow the model's dtype
            dtype = next(iter(loaded.values())).dtype
            raise AdapterFileError(f"{caller}: tensor {bad} overflows {dtype} (the model's dtype); nothing loaded")
    except Exception:
        if previous is None:
            detach(model)
        else:
            detach(model, name)
            apply(model, adapter_set(model), previous, caller=caller)
        raise
    return model


__all__ = ["attach_peft_state", "export_peft", "import_peft", "peft_lora_state", "read_peft"]
