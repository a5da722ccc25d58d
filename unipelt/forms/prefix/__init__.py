"""The prefix functional form (Li & Liang 2021; P-tuning v2; the prefix half of MAM and UniPELT): l learned key and
value vectors per attention module, attended together with the model's own keys and values.

vectors.py holds the vectors and the optional reparameterisation MLP, one per kind of attention of a module spec
(shared by its layers);
attention.py routes the attention calls (the slot and the attention function). Composition: `gate` is the
softmax gate of attending over [P; K]; add / scale / sigmoid_gate go through the slot's composer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from torch import nn

from ... import compat
from ...compose import Composer
from ...errors import MethodConfigError
from ...sites.names import HEAD_SITES
from ...slot import like
from ...spec_values import choice, positive_float_value, positive_int_value
from ..base import MAX_VECTORS, Built, Counts, Form, option, optional, register
from .attention import PrefixSlot, check_prefix_support, model_eager_attention, prefix_attention
from .vectors import Prefix, PrefixReparam

if TYPE_CHECKING:
    from ...module_spec import Placement
    from ...module_spec import ModuleSpec


@dataclass(frozen=True)
class PrefixOptions:
    length: int = option(30, "l: key and value vectors per attention module", positive_int_value)
    mlp_dim: int | None = option(None, "width of Li & Liang's reparameterisation MLP (training only; folded away "
                                       "for saving); null: train the vectors directly", optional(positive_int_value))
    input_std: float = option(0.02, "std of the MLP's input embedding E (Li & Liang's and He et al.'s nn.Embedding: "
                                    "1.0); used with mlp_dim only", positive_float_value)
    prefix_gate: str = option("kv", "with compose sigmoid_gate: kv multiplies P_K and P_V by the gate (Mao et al.'s "
                                    "code); delta scales the prefix's whole change to the attention output",
                              choice(("kv", "delta")))
    score: str = option("softmax", "softmax: the prefix joins the attention (gate) or is attended apart (add / "
                                   "scale); relu: He et al.'s multi-head parallel adapter (cross_attn_relu): "
                                   "ReLU(W_q·LN(x)·P_kᵀ)·P_v per head, unscaled, beside the attention",
                        choice(("softmax", "relu")))


def attention_kinds(placements: list["Placement"]) -> dict[str, list[int]]:
    """Placement indices per kind of attention (stack and site: encoder self, decoder self, decoder cross), in
    order. Li & Liang and He et al. train one reparameterisation MLP (and input embedding) per kind."""
    kinds: dict[str, list[int]] = {}
    for index, p in enumerate(placements):
        kinds.setdefault(f"{p.stack}_{p.site.replace('.', '_')}", []).append(index)
    return kinds


class PrefixForm(Form):
    name = "prefix"
    Options = PrefixOptions
    sites = HEAD_SITES
    host = "x"
    insertions = ("parallel",)
    compositions = ("gate", "add", "scale", "sigmoid_gate")
    size_key = "length"

    def finish_module(self, spec: "ModuleSpec", raw: Mapping[str, Any], where: str) -> "ModuleSpec":
        if spec.options.mlp_dim is None and spec.options.input_std != PrefixOptions.input_std:
            raise MethodConfigError(f"{where}: input_std is the reparameterisation MLP's input; it needs mlp_dim")
        if spec.options.score == "relu" and spec.compose not in ("add", "scale"):
            raise MethodConfigError(f"{where}: score 'relu' (attended beside the attention) needs compose 'add' or "
                                    f"'scale', got '{spec.compose}'")
        return spec

    def folded(self, options: PrefixOptions) -> PrefixOptions:
        return dataclasses.replace(options, mlp_dim=None, input_std=PrefixOptions.input_std)

    def prepare(self, model: nn.Module, spec: "ModuleSpec", where: str) -> "ModuleSpec":
        check_prefix_support(model)
        return spec

    def build(self, spec: "ModuleSpec", placements: list["Placement"], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        options = spec.options
        # Every transformers-private name the routing reads is checked before anything changes.
        compat.check_model(model, prompts=False, prefixed_attention=[modules[p.x_name] for p in placements])
        children: dict[str, nn.Module] = {}
        reparam_of: dict[int, tuple[PrefixReparam, int]] = {}  # placement -> (its MLP, its index there)
        if options.mlp_dim is not None:
            kinds = attention_kinds(placements)
            for kind, members in kinds.items():
                first = placements[members[0]]
                reparam = PrefixReparam(options.length, first.d_x, options.mlp_dim,
                                        [placements[i].kv_heads * placements[i].head_dim for i in members],
                                        options.input_std)
                reparam = reparam.to(**like(modules[first.x_name]))
                children[f"unipelt_{spec.name}_reparam" + (f"_{kind}" if len(kinds) > 1 else "")] = reparam
                reparam_of.update({i: (reparam, position) for position, i in enumerate(members)})
        slots = []
        for index, p in enumerate(placements):
            reparam, position = reparam_of.get(index, (None, 0))
            prefix = Prefix(options.length, p.kv_heads, p.head_dim, reparam, position)
            eager = model_eager_attention(modules[p.x_name])
            query = (modules[p.q_name], p.q_chunk) if options.score == "relu" else None
            slots.append(PrefixSlot(spec, prefix, p.site, model.config, eager, p.d_x, query))
        return Built(slots, children=children)

    def count(self, spec: "ModuleSpec", placements: list["Placement"]) -> Counts:
        """2·l·d_kv per attention module (keys and values of every key/value head) plus the composer (and, for the
        ReLU score, its LayerNorm on x: 2·d); each kind's MLP (embedding l·d, W1 d·m + m, W2 m·Σ2·d_kv + Σ2·d_kv) is
        reparam: it trains, it is not added."""
        length, mlp_dim = spec.options.length, spec.options.mlp_dim
        vectors = sum(2 * length * p.kv_heads * p.head_dim for p in placements)
        composers = sum(Composer.parameter_count(spec, p.d_x) + 2 * p.d_x * (spec.options.score == "relu")
                        for p in placements)
        reparam = 0
        for members in (attention_kinds(placements).values() if mlp_dim is not None else ()):
            d_model = placements[members[0]].d_x
            out = sum(2 * placements[i].kv_heads * placements[i].head_dim for i in members)
            reparam += length * d_model + d_model * mlp_dim + mlp_dim + mlp_dim * out + out
        trainable = composers + (reparam if mlp_dim is not None else vectors)
        return Counts(added=vectors + composers, reparam=reparam, trainable=trainable)

    def size_cap(self, placements: list["Placement"]) -> int:
        return MAX_VECTORS


register(PrefixForm())

__all__ = ["Prefix", "PrefixForm", "PrefixOptions", "PrefixReparam", "PrefixSlot", "prefix_attention"]
