"""save_adapter / load_adapter: adapter-only safetensors plus a JSON with the method and the base's identity.

A reparameterised prefix is saved folded (plain key/value vectors, method written with mlp_dim: null), the form
the paper counts and inference uses. Files are written to a temporary name and renamed, so a crash never leaves
a half-written file that a later load would accept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import compat
from .adapter_set import apply, check_name
from .attach import adapter_set, attach_method, detach, fold_prefixes, is_attached, refuse_wrapped, state_of
from .errors import AdapterFileError
from .sites.identity import base_identity, config_hash  # noqa: F401  config_hash: part of this module's API
from .spec import MethodSpec, load_method

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "unipelt_adapter.json"
@compat.accepts_compiled
def adapter_state(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Everything an adapter trained, by its saved name (the `default` adapter's parameter names, whatever the
    adapter is called), with reparameterised prefixes folded."""
    state = state_of(model, name, "save_adapter")
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():  # a reparameterisation is run as inference runs it (an LSTM's kernels differ with autograd)
        for slot_name, slot in state.slots.items():
            for pname, param in slot.exported_parameters().items():
                tensors[f"{slot_name}.{pname}"] = param
    for pname in state.trained_base + state.trained_head:
        tensors[pname] = owned_value(model, state, pname)
    return {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}


def owned_value(model: nn.Module, state: Any, pname: str) -> torch.Tensor:
    """The adapter's own value of a base / head parameter it trains: in the model while the adapter is in force,
    else its stored copy (unipelt.adapter_set)."""
    aset = adapter_set(model)
    if pname in aset.in_force and aset.in_force[pname] != state.name:
        return aset.stored[state.name][pname]
    return model.get_parameter(pname)


def parameter_path(state: Any, key: str) -> str:
    """The model's parameter path of a saved tensor name (a non-default adapter's children carry its name)."""
    for canonical in state.slots:
        if key.startswith(canonical + "."):
            host, _, slot_name = canonical.rpartition(".")
            return (f"{host}." if host else "") + state.child(slot_name) + key[len(canonical):]
    return key


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to a temporary name beside `path`, flush it to disk, then rename it over `path`: a crash never
    leaves a half-written file that a later load would accept (adapters, checkpoints, results)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def non_finite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or inf (with which), or None."""
    for name, tensor in tensors.items():
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            return f"'{name}' ({'nan' if bool(torch.isnan(tensor).any()) else 'inf'})"
    return None


def read_json(path: Path, caller: str) -> Any:
    """A JSON file (a UTF-8 BOM is allowed), or one AdapterFileError line naming the file and the reason."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{caller}: {path} is not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise AdapterFileError(f"{caller}: {path} is not UTF-8 text (byte {exc.start})") from None


def make_directory(directory: str | os.PathLike, caller: str) -> Path:
    """The output folder, created; one line when it cannot be (a file of that name, no permission)."""
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdapterFileError(f"{caller}: cannot create the folder {out} ({exc.strerror or exc})") from None
    return out


@compat.accepts_compiled
def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Save one adapter (`name`; default the only or the active one): its tensors and a JSON with the method and
    the base's identity. The file is the same whatever the adapter is called."""
    state = state_of(model, name, "save_adapter")
    if state.merged:
        raise AdapterFileError("save_adapter: modules are merged into the weights; call unipelt.unmerge first")
    adapters = [p for module in [*state.slots.values(), *state.reparams.values()] for p in module.parameters()]
    if any(getattr(p, "full_tensor", None) is not None for p in adapters):  # FSDP2 keeps DTensor shards
        raise AdapterFileError("save_adapter: the model is sharded (FSDP); call "
                               "unipelt.train.sharding.save_adapter(model, directory, info) on every rank")
    tensors = adapter_state(model, state.name)
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise AdapterFileError(f"save_adapter: tensor {bad} holds non-finite values; nothing written")
    out = make_directory(directory, "save_adapter")
    meta = {
        "format_version": FORMAT_VERSION,
        "method": _with_controller_changes(state.method.folded(), state.controllers).to_dict(),
        "base_model": base_identity(model.config),
        "tensors": len(tensors),
    }
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out


def _with_controller_changes(method: MethodSpec, controllers: dict[str, Any]) -> MethodSpec:
    """The method with what training controllers decided written in (AdaLoRA's allocator: the pruned ranks)."""
    names = [m.name for m in method.modules]
    for controller in controllers.values():
        changes = getattr(controller, "spec_changes", None)
        if changes is not None:
            module, options = changes()
            method = method.replace_module(names.index(module), **options)
    return method


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    src = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise AdapterFileError(f"load_adapter: {src / name} not found")
    meta = read_json(src / CONFIG_FILE, "load_adapter")
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), dict):
        raise AdapterFileError(f"load_adapter: {src / CONFIG_FILE} has no 'method' mapping")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"load_adapter: format_version {meta.get('format_version')!r} in {src / CONFIG_FILE} "
            f"(this unipelt reads {FORMAT_VERSION})"
        )
    tensors = read_tensors(src / WEIGHTS_FILE, "load_adapter")
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise AdapterFileError(f"load_adapter: tensor {bad} in {src / WEIGHTS_FILE} holds non-finite values")
    return meta, tensors


def read_tensors(path: Path, caller: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one AdapterFileError line naming the caller and the file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterFileError(f"{caller}: {path} is corrupt or unreadable ({first})") from None


def _refuse(key: str, there: Any, here: Any) -> None:
    raise AdapterFileError(
        f"load_adapter: adapter was saved for a different base model: {key} {there!r} there, {here!r} here"
    )


# What the identity of files written before the whole config was recorded holds besides its shape fields.
IDENTITY_LAYOUT = {"model_type", "name_or_path", "architecture", "config_hash"}


def _check_identity(saved: Any, config: Any) -> None:
    current = base_identity(config)
    if not isinstance(saved, dict):
        raise AdapterFileError(f"load_adapter: base_model must be a mapping of the base's fields, got {saved!r}")
    if set(saved) - IDENTITY_LAYOUT:
        _check_listed_fields(saved, current)
        return
    for key, value in saved.items():
        if key == "name_or_path":
            continue
        if key == "architecture" and isinstance(value, dict):  # name the field that differs, not only the hash
            here = current["architecture"]
            differs = next((k for k in sorted(set(value) | set(here)) if value.get(k) != here.get(k)), None)
            if differs is not None:
                _refuse(differs, value.get(differs), here.get(differs))
            continue
        if current.get(key) != value:
            _refuse(key, value, current.get(key))


def _check_listed_fields(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """An adapter saved by unipelt before 2026-12 (same format_version): its identity lists shape fields at the top
    and an architecture dict of selected fields, hashed by another rule. Every field it lists must equal this base's
    (what that version checked); its hash is not comparable and is skipped."""
    here = {**current["architecture"], "model_type": current["model_type"]}
    listed = {k: v for k, v in saved.items() if k not in ("name_or_path", "config_hash", "architecture")}
    architecture = saved.get("architecture")
    listed.update(architecture if isinstance(architecture, dict) else {})
    for key in sorted(listed):
        if listed[key] != here.get(key):
            _refuse(key, listed[key], here.get(key))


@compat.accepts_compiled
def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load a saved adapter into the adapter `name`: attached first (and made active) when the model has no
    adapter of that name, else its tensors replace that adapter's (the methods must be equal). Without a name: into
    the only / active adapter of an attached model, else as "default". On any error the model is unchanged."""
    refuse_wrapped(model, "load_adapter")
    if name is not None:
        check_name(name, "load_adapter")
    target = None
    if is_attached(model) and (name is None or name in adapter_set(model).adapters):
        target = state_of(model, name, "load_adapter")
        if target.merged:
            # merged weights hold the old ΔW; new adapter values would make unmerge() subtract the wrong one
            raise AdapterFileError("load_adapter: modules are merged into the weights; call unipelt.unmerge first")
    meta, tensors = read_adapter(directory)
    _check_identity(meta.get("base_model", {}), model.config)
    method = load_method(meta["method"])
    attached_here = target is None
    previous = adapter_set(model).active if attached_here and is_attached(model) else None
    if attached_here:
        attach_method(model, method, name)
        target = state_of(model, name, "load_adapter")
    elif target.method.folded() != method:
        raise AdapterFileError(
            f"load_adapter: the attached method '{target.method.name}' (adapter '{target.name}') differs from the "
            f"saved one '{method.name}'; detach first, or load it under another name="
        )
    try:
        _copy_tensors(model, target, tensors, directory)
    except Exception:
        if attached_here:  # back to the model as it was: without the new adapter, the old composition active
            if previous is None:
                detach(model)
            else:
                detach(model, target.name)
                apply(model, adapter_set(model), previous, caller="load_adapter")
        raise
    return model


def _copy_tensors(model: nn.Module, state: Any, tensors: dict[str, torch.Tensor], directory) -> None:
    # adapter_state already names reparameterised prefixes in folded form, so every check runs before folding:
    # a file that fails them leaves an attached model exactly as it was (MLP included).
    expected = adapter_state(model, state.name)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise AdapterFileError(f"load_adapter: {len(missing)} tensors missing in {directory}, e.g. '{missing[0]}'")
    if extra:
        raise AdapterFileError(f"load_adapter: {len(extra)} unexpected tensors in {directory}, e.g. '{extra[0]}'")
    for name, tensor in tensors.items():
        if expected[name].dtype.is_floating_point and not tensor.dtype.is_floating_point:
            raise AdapterFileError(f"load_adapter: tensor '{name}' has dtype {tensor.dtype} in the file, "
                                   f"{expected[name].dtype} in the model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise AdapterFileError(
                f"load_adapter: tensor '{name}' has shape {tuple(tensor.shape)} in the file, "
                f"{tuple(expected[name].shape)} in the model"
            )
        cast = tensor.to(expected[name].dtype)  # the finite check of the file's values, again in the model's dtype
        if cast.dtype.is_floating_point and not bool(torch.isfinite(cast).all()):
            raise AdapterFileError(f"load_adapter: tensor '{name}' in {directory} overflows {cast.dtype} (the "
                                   f"model's dtype; largest |value| {float(tensor.abs().max()):.4g}); nothing loaded")
    fold_prefixes(model, state.name)
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = owned_value(model, state, key) if key in state.trained_base + state.trained_head \
                else model.get_parameter(parameter_path(state, key))
            target.copy_(tensor.to(target.dtype))
