"""The data types of the form contract: the spec of one module (a point on He et al.'s four axes plus the form's
typed options) and a placement (one module spec resolved at one site of one layer of a model).

They sit below the forms, which receive them, and below the spec layer (unipelt.spec), which validates module specs
against what the forms declare, and the placement layer (unipelt.placement), which resolves them on a model.
Nothing here knows any form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .sites.names import STACKS


@dataclass(frozen=True)
class ModuleSpec:
    """One modification Δh: a point on the four axes, where it acts, and the functional form's typed options.

    The form's options read as attributes too (`module.dim`, `module.length`), so a module spec reads like its
    YAML; `replace(**changes)` changes axes and options alike and keeps them typed."""

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
    options: Any = None  # the form's Options dataclass (the spec layer always sets it)

    def __getattr__(self, key: str) -> Any:
        options = self.__dict__.get("options")
        if not key.startswith("__") and options is not None and hasattr(options, key):
            return getattr(options, key)
        raise AttributeError(f"module spec of form '{self.__dict__.get('form')}' has no option '{key}'")

    def replace(self, **changes: Any) -> "ModuleSpec":
        own = {f.name for f in dataclasses.fields(self)}
        options = {k: v for k, v in changes.items() if k not in own}
        common = {k: v for k, v in changes.items() if k in own}
        if options:
            common["options"] = dataclasses.replace(common.get("options", self.options), **options)
        return dataclasses.replace(self, **common)


@dataclass(frozen=True)
class Placement:
    """One module spec placed at one site of one layer."""

    spec: ModuleSpec
    site: str
    stack: str
    layer: int
    kind: str  # "projection", "sublayer", "heads", "activation", "norm" or "embeddings" (a prompt at the input)
    h_name: str  # module whose output (projection, sub-layer, norm) or input (heads, activation) is h
    x_name: str  # module whose input is x (the same as h_name for projections)
    chunk: tuple[int, int] | None
    d_in: int  # input width of the functional form (x for parallel, h for sequential)
    d_out: int
    d_x: int  # width of the site input x (what a sigmoid gate reads)
    n_heads: int = 0
    head_dim: int = 0
    kv_heads: int = 0
    encoder_name: str = ""  # encoder-decoders, at the input: the encoder stack, which generate() calls directly
    q_name: str = ""  # heads: the attention's query projection (He et al.'s ReLU prefix attention re-applies it)
    q_chunk: tuple[int, int] | None = None
    # "h": the slot lives on the h module; "x": on the module it acts through (the attention module for a prefix,
    # the base model for a prompt) -- the form's `host`, copied here when the placement is resolved
    host: str = "h"

    @property
    def slot_name(self) -> str:
        return f"unipelt_{self.spec.name}_{self.site.replace('.', '_')}"

    @property
    def host_name(self) -> str:
        """The module that owns the slot: the h module, or the x module for forms that act through it (the
        attention module for a prefix, the base model for a prompt)."""
        return self.x_name if self.host == "x" else self.h_name

    @property
    def modifies_input(self) -> bool:
        """h is the input of the h module (heads, activation), not its output."""
        return self.kind in ("heads", "activation")


__all__ = ["ModuleSpec", "Placement"]
