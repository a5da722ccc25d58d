"""The fusion functional form: AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning") over named bottleneck adapters already on the model, as AdapterHub's
`BertFusion` computes it (adapters' src/adapters/methods/modeling.py, and the Fuse path of methods/bottleneck.py).

At each of its sites the fusion reads what the fused adapters read there (the source u: h for a sequential
adapter, LN(h + residual) at Pfeiffer's `ffn.ln`), runs every member's bottleneck on u and attends over their
outputs v_i = s_i·Δ_i(u) (each member's composed Δh: its scale or gate included):

    q = W_q u + b_q,   k_i = W_k v_i + b_k,   α = softmax_i(q · k_i / T),   Δh = Σ_i α_i W_v v_i

composed by add (h + Δh; at `ffn.ln` the LayerNorm is applied again, as for the members). Options follow
AdapterHub's `DynamicAdapterFusionConfig` (the default there): query, key and value layers (`query`, `key`,
`value`: false uses the input itself), W_q and W_k N(0, 0.02) with zero biases, W_v without bias and, with
`value_initialized`, the identity plus 1e-6 off the diagonal; `value_before_softmax` (false: W_v applied to
Σ α_i v_i); `residual_before` (the members' input h is added to each v_i, keys included, and the output
replaces h instead of being added to it; not at `ffn.ln`, whose pre-norm h the hook does not see);
`temperature` (T starts at 50 and falls by 0.05 per training forward to 1; else T = 1); dropout on the scores
(`dropout`, default the model's attention_probs_dropout_prob, as AdapterHub); `regularization`: 0.01·‖I − W_v‖²
per site, returned by regularization_loss() (AdapterHub's AdapterTrainer backpropagates the same term at each
step end whenever W_v trains, reading no flag). Static AdapterFusion is `value: false`. Parallel adapters (LoRA
included) are not fused: AdapterFusion's query and residual are a sequential adapter's input.

Activation. The fusion is an adapter of its own (`unipelt.attach(model, method, name="fusion")`), attached after
its members (`adapters: [a, b, ...]`, each a sequential bottleneck adapter at exactly the fusion's sites) and active
like any other: `set_active(model, "fusion")` runs the members' bottlenecks inside the fusion while the members
themselves are off (their own hooks add nothing), and trains the fusion layers only (the members are inactive, so
frozen). A member active on the same rows as the fusion would add its Δh twice: refused (rows of a BatchSplit or a
mixed batch apart are fine). While a fusion uses an adapter, that adapter cannot be deleted or renamed, and a merged
member is refused at the fusion's next forward.

Differences from AdapterHub, by choice: the temperature falls in training forwards only (AdapterHub counts every
call, evaluation included); the unused `dense` layer AdapterHub builds when query, key and value are all off is not
built (nothing reads it); `query_before_ln` is not offered (at `ffn.ln` the pre-norm FFN output is not seen here,
and at the other sites it changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..compose import Composer
from ..errors import AttachError, MethodConfigError
from ..module_spec import ModuleSpec, Placement
from ..sites.names import ALL_LINEAR, NORM_SITES, SITES
from ..slot import Delta, Slot
from ..spec_values import expect, probability_value
from .base import Built, Counts, Form, option, optional, register
from .bottleneck import Bottleneck, HeadBottleneck, matmul_input

STATE_ATTR = "_unipelt"  # where unipelt.attach keeps a model's adapters (an AdapterSet), read here by what it holds
TEMPERATURE_START = 50.0
REGULARIZATION = 0.01


def _adapter_names(value: Any, where: str) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise MethodConfigError(f"{where}: expected a non-empty list of adapter names to fuse, got {value!r}")
    repeated = next((v for v in value if list(value).count(v) > 1), None)
    if repeated is not None:
        raise MethodConfigError(f"{where}: adapter '{repeated}' is listed twice")
    return tuple(value)


@dataclass(frozen=True)
class FusionOptions:
    adapters: tuple[str, ...] = option((), "the named bottleneck adapters it fuses (attached before it)",
                                       _adapter_names)
    query: bool = option(True, "a query layer W_q on the members' input (false: the input itself)", expect(bool))
    key: bool = option(True, "a key layer W_k on each member's output (false: the output itself)", expect(bool))
    value: bool = option(True, "a value layer W_v on the members' outputs (false: static AdapterFusion)",
                         expect(bool))
    value_initialized: bool = option(True, "W_v starts as the identity (1e-6 off the diagonal)", expect(bool))
    value_before_softmax: bool = option(True, "W_v on each output before the weighted sum (false: after it)",
                                        expect(bool))
    residual_before: bool = option(False, "add the members' input h to every output before attending; the result "
                                          "replaces h", expect(bool))
    temperature: bool = option(False, "softmax temperature from 50 down to 1 over training (else 1)", expect(bool))
    regularization: bool = option(True, "regularization_loss() = 0.01·‖I − W_v‖² per site", expect(bool))
    dropout: float | None = option(None, "dropout on the attention scores (default: the model's "
                                         "attention_probs_dropout_prob)", optional(probability_value))


def _linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(layer.weight, std=0.02)  # BERT's init, as AdapterHub's fusion layers get it
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class FusionDelta(Delta):
    """One site's fusion layer. The members' slots are held as plain references (`members`: (name, slot) pairs),
    not as children: their parameters stay theirs (counted, saved and trained with their own adapter)."""

    def __init__(self, options: FusionOptions, d_in: int, d_out: int, dropout: float,
                 members: list[tuple[str, Slot]]) -> None:
        super().__init__()
        self.options = options
        self.members = members
        self.query = _linear(d_in, d_out) if options.query else None
        self.key = _linear(d_out, d_out) if options.key else None
        self.value = _linear(d_out, d_out, bias=False) if options.value else None
        if self.value is not None and options.value_initialized:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.dropout = nn.Dropout(dropout)
        self.temperature = TEMPERATURE_START if options.temperature else 1.0
        self._step = self.temperature / 1000.0

    def outputs(self, u: torch.Tensor) -> torch.Tensor:
        """Every member's composed Δh on u, stacked before the feature dimension: [..., members, d]."""
        values = []
        for name, slot in self.members:
            if slot.merged:
                raise AttachError(f"fusion: adapter '{name}' is merged into the weights; unmerge it before running "
                                  "a fusion of it")
            delta = slot.delta_module(u)
            values.append(delta * slot.composer.factor(u, delta))  # add: 1.0, scale: s, sigmoid_gate: g(u)
        return torch.stack(values, dim=-2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        values = self.outputs(u)
        if self.options.residual_before:
            values = values + u.unsqueeze(-2)
        query = u if self.query is None else self.query(matmul_input(u, self.query.weight))
        keys = values if self.key is None else self.key(values)
        before = self.value is not None and self.options.value_before_softmax
        mixed = self.value(values) if before else values
        scores = torch.matmul(query.unsqueeze(-2), keys.transpose(-1, -2)).squeeze(-2)  # [..., members]
        probs = torch.softmax(self.dropout(scores) / self.temperature, dim=-1)
        if self.training and self.options.temperature:
            self.temperature = max(self.temperature - self._step, 1.0)
        out = torch.matmul(probs.unsqueeze(-2), mixed).squeeze(-2)
        if self.value is not None and not before:
            out = self.value(out)
        return out - u if self.options.residual_before else out  # composed by add: h + (out − h) = out

    def regularization_loss(self) -> torch.Tensor | None:
        if not self.options.regularization or self.value is None or not self.value.weight.requires_grad:
            return None
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return REGULARIZATION * (eye - self.value.weight).pow(2).sum()

    def training_state(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])


def _where(p: Placement) -> str:
    return f"'{p.site}' of {p.stack} layer {p.layer}"


def _members_at(model: nn.Module, spec: ModuleSpec, placements: list[Placement],
                where: str) -> list[list[tuple[str, Slot]]]:
    """For each placement, the fused adapters' slots there (in `adapters` order); every refusal in one line."""
    aset = model.__dict__.get(STATE_ATTR)
    attached = {} if aset is None else aset.adapters
    wanted = {(p.stack, p.layer, p.site): p for p in placements}
    found: dict[tuple, dict[str, Slot]] = {key: {} for key in wanted}
    for name in spec.options.adapters:
        if name not in attached:
            raise AttachError(f"{where}: adapters: no adapter named '{name}' on this model to fuse (it has: "
                              f"{', '.join(attached) or 'none'}); attach the bottleneck adapters first")
        state = attached[name]
        if state.merged:
            raise AttachError(f"{where}: adapter '{name}' is merged into the weights; unmerge it before fusing it")
        for p, slot in zip(state.placements, state.slots.values()):
            module = f"adapter '{name}' module '{p.spec.name}'"
            if not isinstance(slot.delta_module, (Bottleneck, HeadBottleneck)):
                raise AttachError(f"{where}: {module} is a '{p.spec.form}' module; AdapterFusion fuses bottleneck "
                                  "adapters only")
            if p.spec.insertion != "sequential":
                raise AttachError(f"{where}: {module} is a parallel adapter; AdapterFusion fuses sequential "
                                  "bottleneck adapters (its query and residual are their input h)")
            key = (p.stack, p.layer, p.site)
            if key not in wanted:
                raise AttachError(f"{where}: {module} sits at {_where(p)}, which this fusion does not cover; the "
                                  "fused adapters must sit at exactly the fusion's sites (its 'at' and 'layers')")
            if name in found[key]:
                raise AttachError(f"{where}: adapter '{name}' has two modules at {_where(p)}; fuse adapters with "
                                  "one module per site")
            found[key][name] = slot
        for key, p in wanted.items():
            if name not in found[key]:
                raise AttachError(f"{where}: adapter '{name}' has no module at {_where(p)}; the fused adapters must "
                                  "sit at exactly the fusion's sites")
    return [[(name, found[key][name]) for name in spec.options.adapters] for key in wanted]


class FusionForm(Form):
    name = "fusion"
    Options = FusionOptions
    sites = SITES + (ALL_LINEAR,)
    insertions = ("sequential",)
    compositions = ("add",)

    def check(self, options: FusionOptions, where: str) -> None:
        if not options.adapters:
            raise MethodConfigError(f"{where}: adapters: name the bottleneck adapters to fuse (e.g. [a, b])")

    def finish_module(self, spec: ModuleSpec, raw: Mapping[str, Any], where: str) -> ModuleSpec:
        norm = next((site for site in spec.at if site in NORM_SITES), None)
        if spec.options.residual_before and norm is not None:
            raise MethodConfigError(f"{where}: residual_before adds the sub-layer output before its residual, which "
                                    f"'{norm}' (a LayerNorm's input) does not see; use residual_before: false there")
        return spec

    def uses_adapters(self, spec: ModuleSpec) -> tuple[str, ...]:
        return spec.options.adapters

    def build(self, spec: ModuleSpec, placements: list[Placement], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        where = f"fusion module '{spec.name}'"
        members = _members_at(model, spec, placements, where)
        options = spec.options
        dropout = options.dropout
        if dropout is None:
            dropout = float(getattr(model.config, "attention_probs_dropout_prob", 0.0) or 0.0)
        slots = []
        for p, fused in zip(placements, members):
            form = FusionDelta(options, p.d_in, p.d_out, dropout, fused)
            slots.append(Slot(spec, form, Composer(spec, p.d_in), p.site, p.chunk))
        return Built(slots)

    def count(self, spec: ModuleSpec, placements: list[Placement]) -> Counts:
        """Per placement: W_q d_in·d + d, W_k d·d + d, W_v d·d (no bias), each where it is on (d = h's width)."""
        o = spec.options
        total = 0
        for p in placements:
            d = p.d_out
            total += (p.d_in * d + d) * o.query + (d * d + d) * o.key + d * d * o.value
        return Counts(added=total, trainable=total)


register(FusionForm())
