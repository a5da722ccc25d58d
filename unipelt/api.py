"""The public entry points that solve a budget first: `unipelt.attach` and `unipelt.count_parameters`.

Budget solving counts placements on a meta copy of the architecture (unipelt.budget, above accounting and
attach), so the layers below never call back up: attach_method and the accounting take sizes as given.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import compat
from .accounting import count_parameters as count_sized
from .attach import attach_method, check_model
from .budget import solve_budget
from .spec import load_method


@compat.accepts_compiled
def attach(model: nn.Module, method: Any, name: str | None = None) -> nn.Module:
    """Attach `method` (preset name, YAML path, dict, DictConfig or MethodSpec) to `model` in place, as the adapter
    `name` (default "default"; several may coexist) made active; a budget is solved on the model's config first."""
    spec = load_method(method)
    check_model(model, "attach", name)
    if spec.budget is not None:
        spec = solve_budget(spec, model.config)
    return attach_method(model, spec, name)


@compat.accepts_compiled
def count_parameters(model_or_config: Any, method: Any = None, name: str | None = None) -> dict[str, Any]:
    """Counts for an attached model (its adapter `name`, default the only or active one), or for a config (object,
    hub id or local dir) or a model plus a method (its budget solved first); see unipelt.accounting."""
    if method is not None:
        spec = load_method(method)
        if spec.budget is not None:
            config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
            method = solve_budget(spec, config)
    return count_sized(model_or_config, method, name)


__all__ = ["attach", "count_parameters"]
