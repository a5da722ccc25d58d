"""The prompt functional form (prompt tuning, Lester et al. 2021; P-tuning, Liu et al. 2021): l virtual token
embeddings inserted into the input sequence, met by attention (compose `gate`).

grammar.py reads the options (length, init, template...), tokens.py holds the vectors and the optional prompt
encoder, layout.py plans where each position of the widened sequence comes from, hooks.py routes the prompt
through the model, slot.py is the placed slot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from torch import nn

from ... import compat
from ...errors import AttachError, one_line
from ...sites.names import INPUT_SITES
from ..base import MAX_VECTORS, Built, Counts, Form, option, register
from .grammar import PROMPT_ENCODERS, PROMPT_INITS, default_template, prompt_options, template_to_yaml
from .hooks import head_policy
from .slot import PromptSlot
from .tokens import VirtualTokens, initial_vectors

if TYPE_CHECKING:
    from ...module_spec import Placement
    from ...module_spec import ModuleSpec


@dataclass(frozen=True)
class PromptOptions:
    length: int = option(20, "l: virtual tokens")
    init: str = option("vocab", f"starting vectors: {', '.join(PROMPT_INITS)}")
    init_text: str | tuple[int, ...] | None = option(None, "with init text: a string or a list of token ids")
    encoder: str = option("none", f"P-tuning's prompt encoder (training only): {', '.join(PROMPT_ENCODERS)}")
    encoder_dim: int | None = option(None, "the encoder's hidden width (default: the embedding width)")
    template: tuple | None = option(None, "where the virtual tokens sit (default: all before the input)")


def _encoder_count(kind: str, d: int, h: int) -> int:
    """Parameters of tokens.PromptEncoder: an MLP d → h → d, or a 2-layer bidirectional LSTM (q = h/2 per direction,
    gate blocks 4q, two bias vectors) followed by an MLP 2q → h → d."""
    if kind == "mlp":
        return d * h + h + h * d + d
    q = max(1, h // 2)
    layer1 = 4 * q * d + 4 * q * q + 8 * q
    layer2 = 4 * q * (2 * q) + 4 * q * q + 8 * q
    return 2 * (layer1 + layer2) + (2 * q * h + h) + (h * d + d)


class PromptForm(Form):
    name = "prompt"
    Options = PromptOptions
    sites = INPUT_SITES
    host = "x"
    insertions = ("parallel",)  # computed from nothing in the model
    compositions = ("gate",)  # met by attention
    per_layer = False
    once_per_method = "put all virtual tokens in one template"  # one input sequence, one template
    size_key = "length"

    def parse(self, raw: Mapping[str, Any], where: str) -> PromptOptions:
        return PromptOptions(**prompt_options(raw, where))

    def to_yaml(self, options: PromptOptions) -> dict[str, Any]:
        out = super().to_yaml(options)
        if options.template is not None:
            out["template"] = template_to_yaml(options.template)
        return out

    def input_tokens(self, options: PromptOptions) -> int:
        """The virtual tokens plus the template's anchor tokens (counted once they are token ids: after attach
        has tokenized the anchor texts; before it, a text anchor's length is not known)."""
        anchors = sum(len(item[1]) for item in options.template or () if item[0] == "anchor"
                      and isinstance(item[1], tuple) and all(isinstance(i, int) for i in item[1]))
        return options.length + anchors

    def folded(self, options: PromptOptions) -> PromptOptions:
        # A P-tuning encoder is folded into the plain vectors it produces, as a prefix MLP is.
        return dataclasses.replace(options, encoder="none", encoder_dim=None)

    def prepare(self, model: nn.Module, spec: "ModuleSpec", where: str) -> "ModuleSpec":
        """Every text (init_text, anchors) replaced by token ids of the base model's tokenizer and every id checked
        against the vocabulary, so that what is attached, saved and reloaded needs no tokenizer."""
        compat.check_model(model, prompts=True, prefixed_attention=[])
        vocab = int(model.get_input_embeddings().weight.shape[0])
        cache: list[Any] = []

        def ids_of(value: Any, at: str) -> tuple[int, ...]:
            if isinstance(value, str):
                if not cache:
                    cache.append(_tokenizer(model, at))
                value = tuple(cache[0](value, add_special_tokens=False)["input_ids"])
                if not value:
                    raise AttachError(f"{at}: text tokenizes to no tokens")
            bad = next((i for i in value if i >= vocab), None)
            if bad is not None:
                raise AttachError(f"{at}: token id {bad} is outside the vocabulary (size {vocab})")
            return tuple(value)

        options, changes = spec.options, {}
        if options.init_text is not None:
            ids = ids_of(options.init_text, f"{where}: init_text")
            if len(ids) > options.length:
                raise AttachError(f"{where}: init_text has {len(ids)} tokens, more than length {options.length}")
            changes["init_text"] = ids
        if options.template is not None:
            changes["template"] = tuple(
                (item[0], ids_of(item[1], f"{where}: template anchor")) if item[0] == "anchor" else item
                for item in options.template)
        return spec.replace(**changes) if changes else spec

    def build(self, spec: "ModuleSpec", placements: list["Placement"], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        slots = []
        options = spec.options
        for p in placements:
            embed = modules[p.h_name]
            weight = embed.weight
            vectors = initial_vectors(options.init, options.length, embed, int(weight.shape[0]), options.init_text,
                                      weight)
            tokens = VirtualTokens(vectors, options.encoder, options.encoder_dim)
            template = options.template or default_template(options.length)
            slots.append(PromptSlot(spec, tokens, template, embed, head_policy(model, p.stack == "decoder")))
        return Built(slots)

    def count(self, spec: "ModuleSpec", placements: list["Placement"]) -> Counts:
        """l·d served vectors; with a prompt encoder, the embedding it reads plus the encoder are reparam."""
        options, total = spec.options, Counts()
        for p in placements:
            vectors = options.length * p.d_x
            if options.encoder == "none":
                total += Counts(added=vectors, trainable=vectors)
            else:
                reparam = vectors + _encoder_count(options.encoder, p.d_x, options.encoder_dim or p.d_x)
                total += Counts(added=vectors, reparam=reparam, trainable=reparam)
        return total

    def size_cap(self, placements: list["Placement"]) -> int:
        return MAX_VECTORS


def _tokenizer(model: nn.Module, where: str):
    name = compat.name_or_path(model.config)
    if not name:
        raise AttachError(f"{where}: text needs the base model's tokenizer, but this model has no name_or_path; "
                          "give token ids instead (a list of integers)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any loading failure gets the same one-line advice
        first = one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise AttachError(f"{where}: cannot load the tokenizer of '{name}' for text ({first[:160]}); "
                          "give token ids instead") from None


register(PromptForm())

__all__ = ["PromptForm", "PromptOptions", "PromptSlot"]
