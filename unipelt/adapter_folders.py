"""save_adapters / load_adapters: every adapter of a model in one folder, one subfolder per name.

unipelt layout: <dir>/adapters.json (format version, the names in attach order, the active composition) and
<dir>/<name>/ as save_adapter writes it. PEFT layout (format="peft", PeftModel.save_pretrained's): the adapter
named "default" at the top, every other one in <dir>/<name>/, each as export_peft writes it; load_adapters reads
it too (PeftModel's own multi-adapter folders), so adapters go both ways between unipelt and PEFT.

Both are whole-folder operations. save_adapters builds the new folder beside the old one and swaps it in with
renames; a folder that holds something else is refused. load_adapters reads and checks every adapter before the
first one is attached, and takes every one of them back if a later one fails: the model is as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from . import compat
from .adapter_set import apply, check_name
from .attach import adapter_set, detach, is_attached, refuse_wrapped
from .composition import block_from_config, block_to_config
from .errors import AdapterFileError, UnipeltError
from .io import CONFIG_FILE as UNIPELT_CONFIG, read_adapter, read_json, load_adapter, save_adapter
from .peft_interop import CONFIG_FILE as PEFT_CONFIG, export_peft, import_peft, read_peft

MANIFEST = "adapters.json"
FOLDERS_VERSION = 1


@compat.accepts_compiled
def save_adapters(model: nn.Module, directory: str | os.PathLike, format: str = "unipelt") -> Path:
    """Save every adapter of the model under <directory>/<name>/ (format "unipelt", with adapters.json; or
    "peft", PEFT's multi-adapter layout: "default" at the top). Returns the folder."""
    refuse_wrapped(model, "save_adapters")
    if format not in ("unipelt", "peft"):
        raise AdapterFileError(f"save_adapters: format {format!r} is not one of: unipelt, peft")
    aset = adapter_set(model)
    out = Path(directory)
    _check_replaceable(out)
    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name in aset.adapters:
            if format == "peft":
                export_peft(model, staging if name == "default" else staging / name, name=name)
            else:
                save_adapter(model, staging / name, name=name)
        if format == "unipelt":
            manifest = {"format_version": FOLDERS_VERSION, "adapters": list(aset.adapters),
                        "active": None if aset.active is None else block_to_config(aset.active)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_replaceable(out: Path) -> None:
    """An existing folder is replaced only when it is empty or holds a previous save_adapters folder."""
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"save_adapters: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and _layout(out) is None:
        raise AdapterFileError(f"save_adapters: {out} holds other files (no {MANIFEST} and no PEFT adapter); "
                               "refusing to replace it")


def _swap_in(staging: Path, out: Path) -> None:
    """Put the staged folder where `out` is: the old one is moved aside first and removed only afterwards, so a
    crash leaves the old folder or the new one (or both, the new one under its staging name)."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
    except OSError as exc:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise AdapterFileError(f"save_adapters: cannot write {out} ({exc.strerror or exc})") from None
    shutil.rmtree(old, ignore_errors=True)


def _layout(src: Path) -> str | None:
    if (src / MANIFEST).is_file():
        return "unipelt"
    if (src / PEFT_CONFIG).is_file() or any((d / PEFT_CONFIG).is_file() for d in _subfolders(src)):
        return "peft"
    return None


def _subfolders(src: Path) -> list[Path]:
    return sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))


def _entries(src: Path) -> tuple[str, list[tuple[str, Path]], Any]:
    """(layout, [(name, folder)], active composition or None) of a folder of adapters."""
    layout = _layout(src) if src.is_dir() else None
    if layout is None:
        raise AdapterFileError(f"load_adapters: {src} holds no {MANIFEST} and no PEFT adapter")
    if layout == "unipelt":
        manifest = read_json(src / MANIFEST, "load_adapters")
        if not isinstance(manifest, dict):
            raise AdapterFileError(f"load_adapters: {src / MANIFEST} is not a JSON object")
        if manifest.get("format_version") != FOLDERS_VERSION:
            raise AdapterFileError(f"load_adapters: {src / MANIFEST} has format_version "
                                   f"{manifest.get('format_version')!r} (this unipelt reads {FOLDERS_VERSION})")
        names = manifest.get("adapters")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise AdapterFileError(f"load_adapters: {src / MANIFEST} lists no adapters")
        return layout, [(n, src / n) for n in names], manifest.get("active")
    entries = [("default", src)] if (src / PEFT_CONFIG).is_file() else []
    entries += [(d.name, d) for d in _subfolders(src) if (d / PEFT_CONFIG).is_file()]
    return layout, entries, None


@compat.accepts_compiled
def load_adapters(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Attach every adapter of a save_adapters (or PEFT multi-adapter) folder under its name and restore the saved
    composition; every file is read and checked before anything changes. Returns the names loaded."""
    refuse_wrapped(model, "load_adapters")
    src = Path(directory)
    layout, entries, active = _entries(src)
    existing = set(adapter_set(model).adapters) if is_attached(model) else set()
    for name, folder in entries:
        try:
            check_name(name, "load_adapters")
        except UnipeltError as exc:
            raise AdapterFileError(f"load_adapters: {folder}: {exc}") from None
        if name in existing:
            raise AdapterFileError(f"load_adapters: the model already has an adapter named '{name}'")
        try:
            read_adapter(folder) if layout == "unipelt" else read_peft(folder)
        except UnipeltError as exc:  # name the adapter whose file is bad, before anything is attached
            raise AdapterFileError(f"load_adapters: adapter '{name}': {exc}") from None
    if active is not None:
        block_from_config(active)  # a malformed composition fails here, before anything is attached
    previous = adapter_set(model).active if existing else None
    loaded: list[str] = []
    current = entries[0][0]
    try:
        for name, folder in entries:
            current = name
            if layout == "unipelt":
                load_adapter(model, folder, name=name)
            else:
                import_peft(model, folder, name=name)
            loaded.append(name)
        current = "(the saved composition)"
        if active is not None:
            apply(model, adapter_set(model), block_from_config(active), caller="load_adapters")
    except BaseException as exc:
        for added in reversed(loaded):  # take every one back: the model is as it was
            if not existing and len(adapter_set(model).adapters) == 1:
                detach(model)
            else:
                detach(model, added)
        if previous is not None:
            apply(model, adapter_set(model), previous, caller="load_adapters")
        if isinstance(exc, UnipeltError):
            raise type(exc)(f"load_adapters: adapter '{current}': {exc}") from None
        raise
    return loaded


__all__ = ["MANIFEST", "load_adapters", "save_adapters"]
