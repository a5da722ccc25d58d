"""The prompt's slot: virtual tokens placed at the input of one model, with the template that says where they go.
It acts through hooks on the base model (hooks.py), not on one hidden state, so it replaces the slot's install."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...compose import Composer
from ...module_spec import Placement
from ...slot import Route, Slot
from .hooks import install_prompt_hooks
from .layout import Layout
from .tokens import VirtualTokens


class PromptSlot(Slot):
    """Virtual tokens at the input; composed by attention (compose `gate`), so its composer adds nothing."""

    FORM_ATTR = "tokens"

    def __init__(self, spec: Any, tokens: VirtualTokens, template: tuple, embed: nn.Module, policy: str) -> None:
        super().__init__(spec, tokens, Composer(spec, 0), "embeddings")
        self.template = template
        self.anchor_ids = tuple(i for item in template if item[0] == "anchor" for i in item[1])
        self.extra = tokens.length + len(self.anchor_ids)  # positions inserted per example
        self.policy = policy
        self._embed = [embed]  # a plain list: the base model's embedding must not become a child of the slot
        self._handoff: torch.Tensor | None = None  # encoder-decoders: widened embeddings the base hands its encoder
        self._layouts: dict[str, Layout] = {}  # layout of the call in flight, for the output hooks
        self._first_length: int | None = None  # input length of the last uncached call (rows.py, hooks.py)
        self._peers: list = [self]  # the model's prompt slots (rows.register sets the shared list at install)
        self._extent_open = False  # a unipelt.row_extent opened by this slot's hooks (hooks.py)
        self._pending_extent: tuple | None = None

    def install(self, placement: "Placement", modules: dict[str, nn.Module], model: nn.Module) -> list[Any]:
        return install_prompt_hooks(model, self, placement, modules)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed[0](ids)

    def inserted(self, like: torch.Tensor) -> torch.Tensor:
        """The [virtual; anchor] vectors [extra, d] in the template's order of appearance."""
        parts = [self.tokens.vectors()]
        if self.anchor_ids:
            ids = torch.tensor(self.anchor_ids, device=like.device)
            parts.append(self.embed(ids))
        return torch.cat([p.to(like.dtype) for p in parts], dim=0)

    def exported_parameters(self) -> dict[str, torch.Tensor]:
        """What is saved and counted as added: the l vectors as served (a P-tuning encoder's output, folded)."""
        return {"tokens.embedding": self.tokens.vectors()}

    def reparam_count(self) -> int:
        return self.tokens.reparam_count()

    def cannot_merge(self, host: nn.Module) -> str | None:
        return "virtual tokens at the input (not a weight update)"

    def route_refusal(self, route: Route | None = None) -> str | None:
        """Rows: each row gets its own prompt's virtual tokens (rows.py). A Parallel block: the prompt acts on its
        rows as alone (nothing else acts at the input); an Average weight has nothing to scale."""
        if route is not None and route.shared is not None and route.weight != 1.0:
            return (f"virtual tokens join the input sequence; they have no Δh that an Average weight "
                    f"({route.weight:g}) could scale")
        return None

    def fold(self) -> None:
        self.tokens.fold()


__all__ = ["PromptSlot"]
