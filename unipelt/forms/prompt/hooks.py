"""Prompts at the input (prompt tuning, P-tuning): virtual tokens inserted into the embedded input sequence.

No model is forked and no cache object is touched. A forward pre-hook on the base model turns `input_ids` into
`inputs_embeds` with the virtual tokens (and fixed anchor tokens) placed as the template says, and widens
`attention_mask`, `token_type_ids`, `position_ids` and `cache_position` to match. Virtual tokens sit inside each
example's real tokens (padding stays outside), so left and right padding both work.

- Encoder-decoders: the prompt goes to the encoder only; the widened mask also reaches the decoder's
  cross-attention. generate() calls the encoder directly, so the encoder carries the same hook, and later calls
  with `encoder_outputs` get their mask widened.
- Decoders with a KV cache (generate()): the first call inserts the prompt; a call with a non-empty cache is taken
  to continue one whose cache already holds it: its mask is widened and its position ids / cache positions are
  shifted by the number of inserted tokens.
- Outputs, by head (chosen at attach from the model class):
  causal LM: labels are widened with -100 at inserted positions (so the first real token is predicted from the
  prompt); the returned logits are aligned back to the input: logits[:, j] is the prediction of what follows input
  token j, read after any virtual tokens between j and j+1 (the last one after a trailing prompt).
  token classification / masked LM: labels widened with -100, logits returned at the input tokens' positions.
  decoder sequence classification: the head's last-non-pad pooling reads the last position of the widened
  sequence. encoder sequence classification: the head reads the first real token ([CLS], <s>; P-tuning v2's prompt
  baseline), swapped into widened position 0 before the pooler (BERT) and in last_hidden_state (RoBERTa).
  Base models (no head): widened outputs. Hidden states / attentions stay widened.
- Rows of several prompt adapters (a mixed batch, a BatchSplit; rows.py): every row is laid out with its own
  prompt's template (none for rows of the base or of other forms), the shorter ones padded at their right end
  (mask 0, label -100, embedding 0), so that each row keeps the positions it has alone. A cached call (generate)
  widens the first call's part of the mask as the first call did and shifts each row's positions by its own
  prompt's count.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ... import compat
from ...errors import AttachError
from ...module_spec import Placement
from ...row_extent import close_extent, open_extent
from .inputs import continue_cached, extent_of, serving_of, widen_inputs, widened_mask
from .layout import Layout, align, first_real_order, widen
from .rows import register, serving


class PromptSlot(Protocol):
    """What the hooks read and write of the prompt's slot (slot.py, which installs them through this module)."""

    active: bool
    template: tuple
    extra: int  # positions inserted per example
    policy: str  # how the head reads the widened outputs (head_policy)
    _handoff: torch.Tensor | None
    _layouts: dict[str, Layout]
    _first_length: int | None  # input length of the last uncached call (a mixed batch's cached calls read it)
    _extent_open: bool  # this slot opened a unipelt.row_extent for the forward in flight
    _pending_extent: tuple | None  # seq2seq: the extent the encoder's forward opens

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def inserted(self, like: torch.Tensor) -> torch.Tensor: ...


LOGITS_TO_KEEP = "logits_to_keep"  # transformers' causal-LM keyword: logits of the last k positions only (generate: 1)


# ---- hooks ---------------------------------------------------------------------------------------------------


def _binder(module: nn.Module) -> Callable[[tuple, dict], dict]:
    signature = inspect.signature(module.forward)

    def bind(args: tuple, kwargs: dict) -> dict:
        if not args:
            return dict(kwargs)
        out: dict[str, Any] = {}
        for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out
    return bind


def _open(slot: "PromptSlot", extent: tuple[int, torch.Tensor] | None) -> None:
    """Open the rows' extent (unipelt.row_extent) for the forward that reads the widened sequence."""
    if extent is not None:
        open_extent(*extent)
        slot._extent_open = True


def _close_hook(slot: "PromptSlot"):
    def hook(module, args, kwargs, output):
        if slot._extent_open:
            slot._extent_open = False
            close_extent()
    return hook


def _base_hook(slot: "PromptSlot", bind: Callable, record: bool, takes_positions: bool):
    def hook(module, args, kwargs):
        if not slot.active:
            return None
        kw = bind(args, kwargs)
        serve = serving_of(slot, kw)
        if serve is None:
            return None
        past_len = compat.cache_length(compat.cache_of(kw))
        if past_len > 0:
            continue_cached(serve, kw, past_len, takes_positions)
            return (), kw
        layout = widen_inputs(serve, kw)
        if layout is None:
            return None
        slot._first_length = int(layout.real.shape[1])
        _open(slot, extent_of(layout))
        if record:
            slot._layouts["base"] = layout
        return (), kw
    return hook


def _seq2seq_base_hook(slot: "PromptSlot", bind: Callable):
    def hook(module, args, kwargs):
        if not slot.active:
            return None
        kw = bind(args, kwargs)
        encoded = kw.get("encoder_outputs")
        if encoded is not None:  # generate(): the encoder already ran (with the prompt); widen the mask it gets
            mask = kw.get("attention_mask")
            serve = serving_of(slot, kw, int(encoded[0].shape[0]))
            if serve is None:
                return None
            if mask is not None and mask.dim() == 2:
                widened = widened_mask(serve, mask)
                if widened.shape[-1] == encoded[0].shape[1]:
                    kw["attention_mask"] = widened
                    return (), kw
            if not serve.single:
                raise AttachError("prompt: encoder outputs of rows with prompts of different lengths need the "
                                  "2-D attention_mask of the input (their padding is masked)")
            return None
        serve = serving_of(slot, kw)
        if serve is None:
            return None
        if kw.get("decoder_input_ids") is None and kw.get("decoder_inputs_embeds") is None \
                and kw.get("input_ids") is not None:
            # BART-style models derive decoder inputs from input_ids when given none: before input_ids is replaced
            shifted = compat.decoder_inputs_from(module, kw["input_ids"])
            if shifted is not None:
                kw["decoder_input_ids"] = shifted
        layout = widen_inputs(serve, kw)
        if layout is None:
            return None
        slot._handoff = kw["inputs_embeds"]
        slot._pending_extent = extent_of(layout)  # opened by the encoder's hook, for the encoder's forward
        return (), kw
    return hook


def _encoder_hook(slot: "PromptSlot", bind: Callable):
    def hook(module, args, kwargs):
        if not slot.active:
            return None
        kw = bind(args, kwargs)
        if slot._handoff is not None and kw.get("inputs_embeds") is slot._handoff:
            slot._handoff = None  # the base model's hook already inserted the prompt
            _open(slot, slot._pending_extent)
            slot._pending_extent = None
            return None
        serve = serving_of(slot, kw)
        layout = None if serve is None else widen_inputs(serve, kw)
        if layout is None:
            return None
        _open(slot, extent_of(layout))
        return (), kw
    return hook


def _clear_handoff(slot: "PromptSlot"):
    def hook(module, args, kwargs, output):
        slot._handoff = None
        slot._pending_extent = None
    return hook


def _top_pre_hook(slot: "PromptSlot", bind: Callable):
    def hook(module, args, kwargs):
        slot._layouts.pop("top", None)
        if not slot.active:
            return None
        kw = bind(args, kwargs)
        if compat.cache_length(compat.cache_of(kw)) > 0:
            return None
        source = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        mask = kw.get("attention_mask")
        if source is None or (mask is not None and mask.dim() != 2):
            return None
        batch, length = source.shape[:2]
        serve = serving(slot, batch)
        if serve is None:
            return None
        layout = serve.plan(mask, batch, length, source.device)
        slot._layouts["top"] = layout
        changed = False
        keep = kw.get(LOGITS_TO_KEEP)
        if layout.padded and isinstance(keep, int) and not isinstance(keep, bool) and keep > 0:
            # the last k widened positions are not every row's last k (shorter prompts end in padding): compute
            # every position's logits, aligned to the input, then keep the last k of those
            kw[LOGITS_TO_KEEP], changed = 0, True
            slot._layouts["top_keep"] = keep
        labels = kw.get("labels")
        if labels is not None and labels.dim() >= 2 and tuple(labels.shape[:2]) == (batch, length):
            kw["labels"] = widen(labels, layout, -100, -100)
            changed = True
        return ((), kw) if changed else None
    return hook


def _aligned(output: Any, layout: Layout, positions: torch.Tensor, keys: tuple[str, ...]) -> Any:
    batch = positions.shape[0]

    def fits(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[:2]) == (batch, layout.width)

    if isinstance(output, tuple):
        return tuple(align(t, positions) if fits(t) else t for t in output)
    for key in keys:
        value = output.get(key) if hasattr(output, "get") else None
        if fits(value):
            output[key] = align(value, positions)
    return output


def _output_hook(slot: "PromptSlot", name: str, keys: tuple[str, ...], use_after: bool | str):
    """use_after: True → `after` positions, False → `real`, "first" → widened, first real token at position 0."""
    def hook(module, args, kwargs, output):
        layout = slot._layouts.pop(name, None)
        keep = slot._layouts.pop(f"{name}_keep", None)
        if layout is None or output is None or not slot.active:
            return None
        positions = first_real_order(layout) if use_after == "first" else layout.after if use_after else layout.real
        output = _aligned(output, layout, positions, keys)
        if keep is not None:  # the caller's logits_to_keep, applied after alignment (_top_pre_hook)
            for key in keys:
                value = output.get(key) if hasattr(output, "get") else None
                if isinstance(value, torch.Tensor) and value.dim() >= 2:
                    output[key] = value[:, -keep:]
        return output
    return hook


def head_policy(model: nn.Module, decoder_only: bool) -> str:
    """How outputs line up with the input (see the module docstring); refuses heads that index input positions."""
    name = type(model).__name__
    if model.config.is_encoder_decoder:
        return "seq2seq"
    if model is getattr(model, "base_model", model):
        return "base"
    if "QuestionAnswering" in name:
        raise AttachError(f"prompt: {name} is not supported (its start/end position labels index the input, "
                          "which virtual tokens shift); use a token-classification or sequence head")
    if "CausalLM" in name or "LMHead" in name:
        return "causal"
    if "TokenClassification" in name or "MaskedLM" in name:
        return "token"
    if "SequenceClassification" in name and decoder_only:
        return "pool_last"
    if "SequenceClassification" in name or "MultipleChoice" in name:
        return "pool_first"
    return "none"


def _pooler_hook(slot: "PromptSlot"):
    def hook(module, args, kwargs):
        layout = slot._layouts.get("base")
        if layout is None or not slot.active or not args:
            return None
        return (align(args[0], first_real_order(layout)),) + tuple(args[1:]), kwargs
    return hook


def install_prompt_hooks(model: nn.Module, slot: "PromptSlot", placement: "Placement", modules: dict) -> list[Any]:
    """Hooks that route the prompt through the model; returns their handles (detach removes them)."""
    base = modules[placement.x_name]
    handles: list[Any] = [register(model, slot)]
    if slot.policy == "seq2seq":
        encoder = modules[placement.encoder_name]
        handles.append(base.register_forward_pre_hook(_seq2seq_base_hook(slot, _binder(base)), with_kwargs=True))
        handles.append(base.register_forward_hook(_clear_handoff(slot), with_kwargs=True, always_call=True))
        handles.append(encoder.register_forward_pre_hook(_encoder_hook(slot, _binder(encoder)), with_kwargs=True))
        handles.append(encoder.register_forward_hook(_close_hook(slot), with_kwargs=True, always_call=True))
        return handles
    record = slot.policy in ("pool_last", "pool_first")
    takes_positions = compat.POSITION_KWARGS[0] in compat.forward_parameters(base)
    handles.append(base.register_forward_pre_hook(_base_hook(slot, _binder(base), record, takes_positions),
                                                  with_kwargs=True))
    handles.append(base.register_forward_hook(_close_hook(slot), with_kwargs=True, always_call=True))
    if slot.policy == "pool_first":
        pooler = getattr(base, "pooler", None)
        if isinstance(pooler, nn.Module):
            handles.append(pooler.register_forward_pre_hook(_pooler_hook(slot), with_kwargs=True))
        handles.append(base.register_forward_hook(_output_hook(slot, "base", ("last_hidden_state",), "first"),
                                                  with_kwargs=True, always_call=True))
    elif record:
        handles.append(base.register_forward_hook(_output_hook(slot, "base", ("last_hidden_state",), True),
                                                  with_kwargs=True, always_call=True))
    if slot.policy in ("causal", "token"):
        handles.append(model.register_forward_pre_hook(_top_pre_hook(slot, _binder(model)), with_kwargs=True))
        handles.append(model.register_forward_hook(_output_hook(slot, "top", ("logits",), slot.policy == "causal"),
                                                   with_kwargs=True, always_call=True))
    return handles


__all__ = ["head_policy", "install_prompt_hooks"]
