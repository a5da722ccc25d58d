"""Prefix tuning inside attention, without past_key_values.

transformers routes every attention call through ALL_ATTENTION_FUNCTIONS. An attention module that carries a
prefix gets a shadow config naming `unipelt_prefix`, registered below; that function prepends the learned keys
and values (and widens the mask) and then calls the model's own eager or SDPA attention. No cache object is
touched, so encoders, decoders (with a KV cache in generate()) and encoder-decoders work alike.

compose `gate`: attention over [P_k; K], [P_v; V] — exactly He et al.'s (1−λ)·Attn(x) + λ·softmax(q P_kᵀ) P_v.
compose `add` / `scale`: the ungated ablation Attn(x) + s·softmax(q P_kᵀ) P_v.
compose `sigmoid_gate` (UniPELT), g = mean over tokens of σ(W_g·x), one scalar per example:
  prefix_gate `kv` (the preset; Mao et al.'s code): attention over [g·P_k; K], [g·P_v; V];
  prefix_gate `delta` (our earlier variant, kept as an option): Attn(x) + g·(Attn([P; K]) − Attn(x)), so that a
  closed gate is exactly the base attention (under `kv` zero keys still draw softmax mass).

Several adapters (unipelt.adapters): every active prefix on the module acts, in the module's order; concatenated
ones join one softmax (a Stack of prefixes). Under a Route (mixed batch, BatchSplit) a prefix acts on its rows only
(rows.py: the attention runs once per group of rows that see the same prefixes). A prefix in a Parallel / Average
block contributes weight·(Attn with it − Attn without it), both over the module's prefixes outside any such block.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ... import compat
from ...compose import Composer
from ...errors import AttachError
from ...row_extent import close_extent, narrow
from ...slot import Route, Slot, capture_hook
from .rows import row_groups, take_rows
from .vectors import Prefix

PREFIX_ATTENTION = "unipelt_prefix"
ROUTED = "_unipelt_prefix_routed"  # set in an attention module's __dict__ while its calls are routed here
SUPPORTED_INNER = ("eager", "sdpa")


class PrefixSlot(Slot):
    """A prefix placed on one attention module, composed by the slot's composer (gate, add, scale or sigmoid_gate).

    It has no hook on h: the attention module's calls are routed to `prefix_attention` (install)."""

    FORM_ATTR = "prefix"

    def __init__(self, spec: Any, prefix: Prefix, site: str, base_config: Any,
                 eager_fn: Callable, d_gate_in: int = 0, query: tuple[nn.Module, Any] | None = None) -> None:
        super().__init__(spec, prefix, Composer(spec, d_gate_in), site)
        # score relu (He et al.'s multi-head parallel adapter): the LayerNorm it adds, and the attention's own query
        # projection (module, fused chunk), kept as a plain reference so it stays the base model's.
        self.norm = nn.LayerNorm(d_gate_in) if spec.score == "relu" else None
        self._query = [query] if query is not None else []
        # Plain references (not submodules): the model's real config decides the inner implementation at each
        # call, so set_attn_implementation() after attach keeps working.
        self._base_config = [base_config]
        self._eager_fn = eager_fn

    def install(self, placement: Any, modules: dict[str, nn.Module], model: nn.Module) -> list[Any]:
        attention = modules[placement.x_name]
        handles: list[Any] = []
        if ROUTED not in attention.__dict__:  # the first prefix on this attention module routes it
            handles.append(_Routing(attention))
        if self.reads_input:  # UniPELT's prefix gate, He et al.'s ReLU prefix read the attention input x
            handles.append(attention.register_forward_pre_hook(capture_hook(self), with_kwargs=True))
        return handles

    @property
    def gate(self) -> nn.Linear | None:
        """UniPELT's gate W_g (the composer's), or None."""
        return self.composer.gate

    @property
    def reads_input(self) -> bool:
        """True when the slot needs the attention input x (a sigmoid gate, or the ReLU prefix's own query)."""
        return self.composer.gate is not None or self.norm is not None

    @property
    def concatenated(self) -> bool:
        """True when the prefix joins the attention's keys and values (gate, or sigmoid_gate on P_K and P_V)."""
        return self.spec.compose == "gate" or (self.spec.compose == "sigmoid_gate" and self.spec.prefix_gate == "kv")

    def batched_key_values(self, batch: int, like: torch.Tensor,
                           x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, kv_heads, length, head_dim] keys and values, multiplied by the gate under sigmoid_gate `kv`
        (x: the attention input its gate reads)."""
        keys, values = (_batched(t, batch, like) for t in self.prefix.key_values())
        if self.spec.compose == "sigmoid_gate" and self.spec.prefix_gate == "kv":
            gate = self.composer.factor(x, like=keys).to(like.dtype)  # [batch, 1, 1, 1]
            keys, values = keys * gate, values * gate
        return keys, values

    def exported_parameters(self) -> dict[str, torch.Tensor]:
        """What is saved and counted as added: the prefix as plain key/value vectors (a reparameterisation MLP's
        output, folded), the learned scale and the UniPELT gate."""
        keys, values = self.prefix.key_values()
        own = {name: param for name, param in self.named_parameters() if not name.startswith("prefix.")}
        return {"prefix.keys": keys, "prefix.values": values, **own}

    def cannot_merge(self, host: nn.Module) -> str | None:
        return "a prefix acts inside attention (not a weight update)"

    def route_refusal(self, route: Route | None = None) -> str | None:
        if route is not None and route.shared is not None:
            other = next((m for m in route.shared.members if not isinstance(m, PrefixSlot)), None)
            if other is not None:
                return (f"a prefix acts inside the attention, before the {other.spec.form} module at the same site "
                        f"('{other.site}') reads h, so the two cannot read one shared h in a Parallel / Average block")
        return None

    def fold(self) -> None:
        self.prefix.fold()

    def inner_attention(self) -> Callable:
        return compat.attention_function(compat.attention_implementation(self._base_config[0]), self._eager_fn)


class _Routing:
    """The shadow config that routes an attention module's calls to the prefix function; remove() restores it."""

    def __init__(self, attention: nn.Module) -> None:
        original = getattr(attention, "config", None)
        if original is None:
            raise AttachError(f"prefix: {type(attention).__name__} keeps no config; cannot route its attention")
        self.attention, self.original = attention, original
        attention.config = compat.route_attention(original, PREFIX_ATTENTION)
        attention.__dict__[ROUTED] = True

    def remove(self) -> None:
        self.attention.config = self.original
        self.attention.__dict__.pop(ROUTED, None)


def model_eager_attention(attention: nn.Module) -> Callable:
    """The modeling file's own eager attention function (model-specific details such as T5's position bias)."""
    return compat.eager_attention(attention)


def check_prefix_support(model: nn.Module) -> None:
    impl = compat.attention_implementation(model.config)
    if impl not in SUPPORTED_INNER:
        raise AttachError(
            f"prefix: attention implementation '{impl}' is not supported (allowed: eager, sdpa); "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )


def _batched(t: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=like.dtype).unsqueeze(0).expand(batch, -1, -1, -1)


def _extend_last(t: torch.Tensor, length: int, fill: Any) -> torch.Tensor:
    pad = torch.full((*t.shape[:-1], length), fill, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=-1)


def _causal_mask(q_len: int, k_len: int, like: torch.Tensor) -> torch.Tensor:
    """Additive bottom-right-aligned causal mask [1, 1, q, k] (queries are the last q of the k positions)."""
    q_pos = torch.arange(q_len, device=like.device).unsqueeze(1) + (k_len - q_len)
    k_pos = torch.arange(k_len, device=like.device).unsqueeze(0)
    blocked = torch.finfo(like.dtype).min
    return torch.where(k_pos <= q_pos, 0.0, blocked).to(like.dtype)[None, None]


def prefix_scores_attention(module: nn.Module, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            scaling: float | None) -> torch.Tensor:
    """softmax(q P_kᵀ) P_v over the prefix alone, shaped like an attention output [batch, q, heads, head_dim]."""
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.softmax((query @ keys.transpose(-1, -2)).float() * scaling, dim=-1).to(query.dtype)
    return (weights @ values).transpose(1, 2)


def relu_prefix_attention(slot: PrefixSlot, query_like: torch.Tensor, dropout: float,
                          x: torch.Tensor | None) -> torch.Tensor:
    """He et al.'s cross_attn_relu: ReLU(W_q·LN(x) P_kᵀ) P_v per head, unscaled, [batch, q, heads, head_dim]."""
    if x is None:
        raise RuntimeError("relu prefix: the attention input was not captured")
    projection, chunk = slot._query[0]
    # forward(), not the module's call: the frozen W_q alone, without the hooks other adapters put on it (a LoRA
    # on attn.q of another adapter, routed to other rows, must not act on this query)
    query = projection.forward(slot.norm(x.to(slot.norm.weight.dtype)))
    if chunk is not None:
        query = query.chunk(chunk[1], dim=-1)[chunk[0]]
    batch, length = query.shape[:2]
    heads, head_dim = query_like.shape[1], query_like.shape[-1]
    query = query.view(batch, length, heads, head_dim).transpose(1, 2).to(query_like.dtype)
    keys, values = (_batched(t, batch, query_like) for t in slot.prefix.key_values())
    if heads > keys.shape[1]:  # grouped key/value heads
        keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
        values = values.repeat_interleave(heads // values.shape[1], dim=1)
    weights = nn.functional.dropout(torch.relu(query @ keys.transpose(-1, -2)), p=dropout, training=dropout > 0)
    return (weights @ values).transpose(1, 2)


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    every = [child for child in module.children() if isinstance(child, PrefixSlot)]
    slots = [slot for slot in every if slot.active]
    inner = every[0].inner_attention()
    if not slots:
        return inner(module, query, key, value, attention_mask, **kwargs)
    inputs = {}  # what each slot that reads the attention input captured (read once per call)
    for slot in slots:
        inputs[id(slot)], slot.captured_x = slot.captured_x, None
    batch = query.shape[0]
    groups = row_groups(slots, batch)
    if groups[0][0] is None:
        return _prefixed(module, inner, query, key, value, attention_mask, kwargs, slots, inputs)
    output = None
    for rows, members in groups:
        cut = lambda t: take_rows(t, rows, batch)  # noqa: E731
        sub_kwargs = {name: cut(v) for name, v in kwargs.items()}
        if members:
            sub_inputs = {k: None if x is None else cut(x) for k, x in inputs.items()}
            narrowed = narrow(rows, batch)  # a gate's mean over these rows' own positions (unipelt.row_extent)
            try:
                part, _ = _prefixed(module, inner, cut(query), cut(key), cut(value), cut(attention_mask),
                                    sub_kwargs, members, sub_inputs)
            finally:
                if narrowed:
                    close_extent()
        else:
            part, _ = inner(module, cut(query), cut(key), cut(value), cut(attention_mask), **sub_kwargs)
        if output is None:
            output = part.new_zeros((batch, *part.shape[1:]))
        output = output.index_copy(0, rows.to(part.device), part)
    return output, None  # the groups' attention weights have other key lengths: not returned


def _prefixed(module: nn.Module, inner: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, kwargs: dict, slots: list[PrefixSlot],
              inputs: dict[int, torch.Tensor | None]) -> tuple[torch.Tensor, Any]:
    """The attention with `slots` acting on every row: those outside a Parallel / Average block stacked, each
    block member adding weight·(the output with it − the output without it)."""
    plain = [s for s in slots if s.route is None or s.route.shared is None]
    members = [s for s in slots if s.route is not None and s.route.shared is not None]
    base, weights = _stacked(module, inner, query, key, value, attention_mask, kwargs, plain, inputs)
    output = base
    for member in members:
        with_member, _ = _stacked(module, inner, query, key, value, attention_mask, kwargs, plain + [member], inputs)
        output = output + member.route.weight * (with_member - base)
    return output, weights


def _stacked(module: nn.Module, inner: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, kwargs: dict, slots: list[PrefixSlot],
             inputs: dict[int, torch.Tensor | None]) -> tuple[torch.Tensor, Any]:
    """The attention with every one of `slots` acting: the concatenated ones joined to the keys and values, then
    each other one composed into the output."""
    batch = query.shape[0]
    # each joined prefix's keys and values once per call (a sigmoid gate reads its captured input once)
    joined = [s.batched_key_values(batch, key, inputs.get(id(s))) for s in slots if s.concatenated]
    output, weights = _attend(module, inner, query, key, value, attention_mask, kwargs, joined)
    base = output
    for slot in slots:
        if slot.concatenated:
            continue
        x = inputs.get(id(slot))
        if slot.spec.compose == "sigmoid_gate":  # prefix_gate `delta`
            own = slot.batched_key_values(batch, key, x)
            with_prefix, _ = _attend(module, inner, query, key, value, attention_mask, kwargs, joined + [own])
            output = slot.composer(output, with_prefix - base, x)
        elif slot.spec.score == "relu":
            extra = relu_prefix_attention(slot, query, float(kwargs.get(compat.ATTN_DROPOUT) or 0.0), x)
            output = slot.composer(output, extra)
        else:
            p_keys, p_values = slot.prefix.key_values()
            extra = prefix_scores_attention(module, query, _batched(p_keys, batch, query),
                                            _batched(p_values, batch, query), kwargs.get(compat.ATTN_SCALING))
            output = slot.composer(output, extra)
    return output, weights


def _attend(module: nn.Module, inner: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, kwargs: dict, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """The inner attention over [P_k; K], [P_v; V] with the batched prefix (keys, values) `pairs` (none: the plain
    attention)."""
    kwargs = dict(kwargs)
    q_len, k_len = query.shape[2], key.shape[2]
    if pairs:
        p_keys = torch.cat([k for k, _ in pairs], dim=2)
        p_values = torch.cat([v for _, v in pairs], dim=2)
        length = p_keys.shape[2]
        key = torch.cat([p_keys, key], dim=2)
        value = torch.cat([p_values, value], dim=2)
        is_causal = kwargs.pop(compat.ATTN_IS_CAUSAL, getattr(module, "is_causal", False))
        if attention_mask is None and is_causal and q_len > 1:
            attention_mask = _causal_mask(q_len, k_len, query)
        if attention_mask is not None:
            attention_mask = attention_mask[..., :k_len]
            fill = True if attention_mask.dtype == torch.bool else 0.0
            attention_mask = _extend_last(attention_mask, length, fill)
        bias = kwargs.get(compat.ATTN_POSITION_BIAS)
        if bias is not None:  # T5: a prefix has no relative position, so no bias
            kwargs[compat.ATTN_POSITION_BIAS] = _extend_last(bias[..., :k_len], length, 0.0)
        kwargs[compat.ATTN_IS_CAUSAL] = False  # causality, if any, is now in the explicit mask
    return inner(module, query, key, value, attention_mask, **kwargs)


compat.register_attention(PREFIX_ATTENTION, prefix_attention)
