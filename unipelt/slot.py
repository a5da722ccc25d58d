"""The slot: one form placed at one site, composed into h. The base class owns what every form shares: the hooks
that put it into the model, its composer, and merge / unmerge.

Hooks (install): a site whose h is a module's output (a projection, a sub-layer) gets a forward hook on that
module; a site whose h is a module's input (the concatenated heads at the output projection, the FFN activation
at the down projection) gets a forward pre-hook there. Where x (the insertion's source) is read elsewhere, a
pre-hook captures it first. Order at a shared site (attach installs parallel slots before sequential ones): every
parallel module adds its Δh(x) to h first, then each sequential module sees that h; within each kind, YAML order.

Merge folds a slot whose form has a linear map (Δh = M·u + c, M a matrix or a per-feature diagonal) and whose
composer has a constant factor s into the weight that produces (or consumes) h, and unmerge applies the inverse:
- parallel at a projection (LoRA, AdaLoRA): W += s·M, b += s·c; undone by subtracting;
- sequential per-feature scaling at a projection ((IA)³ at k, v): h' = (1 + s·m)⊙h, so W, b rows scale by
  1 + s·m; undone by dividing;
- sequential per-feature scaling at an activation ((IA)³ at ffn.act): the down projection's columns scale.
Subclasses (prefix, prompt) replace install and report what cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import compat
from .compose import Composer
from .quantize import add_to_4bit, is_4bit, restore_4bit
from .sites.linear import is_transposed
from .sites.names import ACTIVATION_SITES, PROJECTION_SITES

if TYPE_CHECKING:
    from .placement import Placement


@dataclass
class LinearMap:
    """Δh = M·u + c for a linear form: `weight` is M as [out, in], or its diagonal [d] when `diagonal`."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    diagonal: bool = False


def like(module: nn.Module) -> dict[str, Any]:
    """The device and floating dtype of a module's own (else first) parameter: where new modules should live."""
    weight = next((p for p in module.parameters(recurse=False)), None)
    if weight is None:
        weight = next(module.parameters(), None)
    if weight is None:
        return {}
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}


def chunk_rows(chunk: tuple[int, int] | None, out_features: int) -> slice:
    """The output rows a slot modifies: all, or its (index, count) chunk of a fused projection (GPT-2's c_attn)."""
    if chunk is None:
        return slice(None)
    index, count = chunk
    width = out_features // count
    return slice(index * width, (index + 1) * width)


def capture_hook(slot: "Slot"):
    def hook(module, args, kwargs):
        slot.captured_x = compat.module_input(args, kwargs) if slot.enabled else None
    return hook


def _output_hook(slot: "Slot", same_module: bool):
    def hook(module, args, kwargs, output):
        if not slot.enabled:
            return None
        if same_module:
            x = compat.module_input(args, kwargs)
        else:
            x, slot.captured_x = slot.captured_x, None
        if isinstance(output, tuple):
            return (slot(output[0], x),) + output[1:]
        return slot(output, x)
    return hook


def _input_hook(slot: "Slot"):
    def hook(module, args, kwargs):
        if not slot.enabled:
            return None
        x, slot.captured_x = slot.captured_x, None
        if args:
            return (slot(args[0], x),) + tuple(args[1:]), kwargs
        key = next(name for name in compat.MODULE_INPUT_KWARGS if kwargs.get(name) is not None)
        return args, {**kwargs, key: slot(kwargs[key], x)}
    return hook


class Slot(nn.Module):
    """One placed module: Δh = form(x or h), composed into h. `active` / `merged` switch it off in forward."""

    FORM_ATTR = "form"  # the child that computes Δh (subclasses keep their own name: `prefix`, `tokens`)

    def __init__(self, spec: Any, form: nn.Module, composer: Composer, site: str,
                 chunk: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.site = site
        setattr(self, self.FORM_ATTR, form)
        self.composer = composer
        self.chunk = chunk  # (index, count): h is one slice of a fused projection output (GPT-2's c_attn)
        self.active = True
        self.merged = False
        self.captured_x: torch.Tensor | None = None
        self._merge_undo: Any = None  # a 4-bit weight's packed data from before merge (unmerge restores it)

    @property
    def enabled(self) -> bool:
        return self.active and not self.merged

    @property
    def delta_module(self) -> nn.Module:
        return getattr(self, self.FORM_ATTR)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        form = self.delta_module
        parallel = self.spec.insertion == "parallel"
        if self.chunk is None:
            source = x if parallel else h
            scale = self.composer.fixed_factor()
            fusable = getattr(form, "can_add_into", None)
            if scale is not None and fusable is not None and fusable(h):  # up-projection, scale and add: one GEMM
                return form.add_scaled_into(h, source, scale)
            return self.composer(h, form(source), source)
        index, count = self.chunk
        pieces = list(h.chunk(count, dim=-1))
        source = x if parallel else pieces[index]
        pieces[index] = self.composer(pieces[index], form(source), source)
        return torch.cat(pieces, dim=-1)

    def install(self, placement: "Placement", modules: dict[str, nn.Module], model: nn.Module) -> list[Any]:
        """Hook the slot into the model (see the module docstring); returns the handles detach() removes."""
        handles = []
        h_module = modules[placement.h_name]
        same = placement.x_name == placement.h_name
        if not same:
            handles.append(modules[placement.x_name].register_forward_pre_hook(capture_hook(self), with_kwargs=True))
        if placement.modifies_input:
            handles.append(h_module.register_forward_pre_hook(_input_hook(self), with_kwargs=True))
        else:
            handles.append(h_module.register_forward_hook(_output_hook(self, same), with_kwargs=True))
        return handles

    # ---- what the training loop, io and accounting read -----------------------------------------------------

    def training_metrics(self) -> dict[str, float]:
        if self.composer.last_gate is None:
            return {}
        return {"gate": float(self.composer.last_gate)}

    def exported_parameters(self) -> dict[str, torch.Tensor]:
        """What is saved and counted as added: the parameters, with a rank-pruned form cut to what it keeps."""
        tensors = dict(self.named_parameters())
        pruned = getattr(self.delta_module, "pruned_parameters", None)
        if pruned is not None:
            tensors.update({f"{self.FORM_ATTR}.{name}": value for name, value in pruned().items()})
        return tensors

    def reparam_count(self) -> int:
        """Training-only parameters inside the slot (a prompt encoder); shared ones are the model's children."""
        return 0

    def fold(self) -> None:
        """Replace training aids by what they produce (outputs unchanged); nothing to do by default."""

    # ---- merge ----------------------------------------------------------------------------------------------

    def linear_map(self) -> LinearMap | None:
        fn = getattr(self.delta_module, "linear_map", None)
        return None if fn is None else fn()

    def cannot_merge(self, host: nn.Module) -> str | None:
        """Why this slot cannot fold into `host` (the module it hooks), or None when it can."""
        linear = self.linear_map()
        if linear is None or self.composer.merge_factor() is None:
            return "not linear in the input (activation, LayerNorm, gate or prefix)"
        parallel = self.spec.insertion == "parallel"
        if self.site in PROJECTION_SITES:
            if not parallel and not linear.diagonal:
                return "sequential and not a per-feature scaling"
        elif self.site in ACTIVATION_SITES:
            if parallel or not linear.diagonal:
                return "at an activation only a sequential per-feature scaling folds"
        else:
            return f"site '{self.site}' is not one projection"
        if linear.bias is not None and getattr(host, "bias", None) is None:
            return "has a bias but the projection has none"
        if is_4bit(host):
            return None if parallel else "a 4-bit NF4 weight takes additive updates only"
        if not isinstance(getattr(host, "weight", None), torch.Tensor) or not host.weight.dtype.is_floating_point:
            return "the projection weight is not a floating-point tensor (quantized?)"
        if linear.diagonal and bool((1 + self.composer.merge_factor() * linear.weight).eq(0).any()):
            return "a per-feature scale is exactly zero (the fold could not be undone)"
        return None

    @torch.no_grad()
    def merge(self, host: nn.Module) -> float | None:
        """Fold into `host`; returns the max abs rounding error for a 4-bit weight (requantized), else None."""
        error = self._fold(host, +1)
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        self._fold(host, -1)
        self.merged = False

    def _fold(self, host: nn.Module, sign: int) -> float | None:
        linear, factor = self.linear_map(), self.composer.merge_factor()
        if is_4bit(host):
            return self._fold_4bit(host, linear, factor, sign)
        weight = host.weight.T if is_transposed(host) else host.weight  # a view as [out, in]
        dtype = weight.dtype
        delta_b = None if linear.bias is None else (factor * linear.bias).to(dtype)
        if not linear.diagonal:  # parallel at a projection
            rows = chunk_rows(self.chunk, weight.shape[0])
            weight[rows] += sign * (factor * linear.weight).to(dtype)
            if delta_b is not None:
                host.bias[rows] += sign * delta_b
            return None
        scale = (1 + factor * linear.weight).to(dtype)
        if self.site in ACTIVATION_SITES:  # h is the host's input: u' = scale⊙u + c
            if sign > 0 and delta_b is not None:
                host.bias += weight @ delta_b
            if sign > 0:
                weight.mul_(scale[None, :])
            else:
                weight.div_(scale[None, :])
            if sign < 0 and delta_b is not None:
                host.bias -= weight @ delta_b
            return None
        rows = chunk_rows(self.chunk, weight.shape[0])
        if sign > 0:
            weight[rows] *= scale[:, None]
        else:
            weight[rows] /= scale[:, None]
        if getattr(host, "bias", None) is not None:
            shift = 0 if delta_b is None else delta_b
            if sign > 0:
                host.bias[rows] = host.bias[rows] * scale + shift
            else:
                host.bias[rows] = (host.bias[rows] - shift) / scale
        return None

    def _fold_4bit(self, host: nn.Module, linear: LinearMap, factor: float, sign: int) -> float | None:
        rows = chunk_rows(self.chunk, host.out_features)
        dtype = host.bias.dtype if host.bias is not None else torch.get_default_dtype()
        if linear.bias is not None:
            host.bias[rows] += sign * (factor * linear.bias).to(dtype)
        if sign < 0:
            restore_4bit(host, self._merge_undo)
            self._merge_undo = None
            return None
        error, self._merge_undo = add_to_4bit(host, rows, (factor * linear.weight).to(dtype))
        return error


__all__ = ["LinearMap", "Slot", "capture_hook", "chunk_rows", "like"]
