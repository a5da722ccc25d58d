"""Per-method settings in a sweep over methods (`by_method` in an experiment file): the paper tuned some settings
per method (He et al.'s en-ro prefix-tuning baseline trains without label smoothing or weight decay; their
baselines run at their own sizes), and a Hydra sweep cannot pair one list of values with another.

    by_method:
      prefix:                      # the method's `name`
        trainer: {label_smoothing: 0.0, weight_decay: 0.0}
        modules: {m0: {length: 200}}   # module name -> its keys

Trainer keys go through TrainConfig, module keys through unipelt.load_method: a misspelt key is an error naming it."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .. import load_method
from ..errors import UnipeltError, allowed
from ..spec import MethodSpec
from ..train import TrainConfig

SECTIONS = ("trainer", "modules")


def apply_by_method(by_method: Any, spec: MethodSpec, train_cfg: TrainConfig) -> tuple[MethodSpec, TrainConfig]:
    """`spec` and `train_cfg` with the entry for `spec.name` applied (unchanged when there is none)."""
    if isinstance(by_method, DictConfig):
        by_method = OmegaConf.to_container(by_method, resolve=True)
    entry = (by_method or {}).get(spec.name)
    if entry is None:
        return spec, train_cfg
    where = f"by_method.{spec.name}"
    if not isinstance(entry, Mapping):
        raise UnipeltError(f"{where}: expected a mapping with keys {allowed(SECTIONS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(SECTIONS))
    if unknown:
        raise UnipeltError(f"{where}: unknown key '{unknown[0]}' (allowed: {allowed(SECTIONS)})")
    trainer = dict(entry.get("trainer") or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(trainer) - fields)
    if bad:
        raise UnipeltError(f"{where}.trainer: unknown key '{bad[0]}' (allowed: {allowed(sorted(fields))})")
    train_cfg = dataclasses.replace(train_cfg, **trainer)
    modules = dict(entry.get("modules") or {})
    if modules:
        raw = spec.to_dict()
        names = [m["name"] for m in raw["modules"]]
        for name, changes in modules.items():
            if name not in names:
                raise UnipeltError(f"{where}.modules: no module '{name}' in method '{spec.name}' "
                                   f"(modules: {allowed(names)})")
            if not isinstance(changes, Mapping):
                raise UnipeltError(f"{where}.modules.{name}: expected a mapping of module keys, got {changes!r}")
            raw["modules"][names.index(name)].update(changes)
        spec = load_method(raw)
    return spec, train_cfg


__all__ = ["apply_by_method"]
