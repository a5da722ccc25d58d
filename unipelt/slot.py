"""The slot: one form placed at one site, composed into h. The base class owns what every form shares: the hooks
that put it into the model, its composer, and merge / unmerge.

Hooks (install): a site whose h is a module's output (a projection, a sub-layer) gets a forward hook on that
module; a site whose h is a module's input (the concatenated heads at the output projection, the FFN activation
at the down projection) gets a forward pre-hook there; a post-LN LayerNorm site (ffn.ln) re-applies the LayerNorm
to its input plus Δ. Where x (the insertion's source) is read elsewhere, a
pre-hook captures it first. Order at a shared site (attach installs parallel slots before sequential ones): every
parallel module adds its Δh(x) to h first, then each sequential module sees that h; within each kind, YAML order.

Merge folds a slot whose form has a linear map (Δh = M·u + c, M a matrix or a per-feature diagonal) and whose
composer has a constant factor s into the weight that produces (or consumes) h; unmerge restores the weights
exactly (unipelt/weight_fold.py). Subclasses (prefix, prompt) replace install and report what cannot be merged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import compat
from .compose import Composer
from .errors import AttachError
from .quantize import dense_weight, is_4bit
from .route import Route, SharedInput
from .sites.names import ACTIVATION_SITES, PROJECTION_SITES
from .weight_fold import LinearMap, MergeRecord, chunk_rows, fold, unfold

if TYPE_CHECKING:
    from .module_spec import Placement


class HostRef:
    """A live accessor to the module a slot lives on (the placement's host: the projection for LoRA or DoRA, the
    attention module for a prefix, the base model for a prompt), handed to the slot at install.

    It looks the module up by name in the model at every call, so it stays right when the module object is
    replaced after install (QLoRA's 4-bit layers, a user's own quantization) and when it is wrapped in place
    (FSDP2's fully_shard keeps names). It keeps the model as a plain attribute, not a child module: copy.deepcopy
    of the model gives a copy whose accessors reach the copy."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self._model = model
        self.name = name

    @property
    def module(self) -> nn.Module:
        return self._model.get_submodule(self.name)

    def weight(self) -> torch.Tensor:
        """The host's weight as a dense [out, in] tensor (dequantized from 4-bit NF4, untransposed from Conv1D)."""
        return dense_weight(self.module)


class Delta(nn.Module):
    """Base of the modules that compute Δh (a form's `build` puts one in each slot). Every part is optional and has
    its default here; docs/forms.md lists the whole protocol.

    - `linear_map()`: Δh as a LinearMap where it is linear in the input (merge folds it); default None.
    - `bind_host(host)`: called at install with the live accessor to the host module (e.g. DoRA reads the weight
      it normalises); default: kept as `self.host_ref`, read through `self.host`.
    - `pruned_parameters()`: the tensors to save and count when fewer than all parameters can act (AdaLoRA's kept
      triplets); default None (all of them).
    """

    host_ref: "HostRef | None" = None

    def linear_map(self) -> LinearMap | None:
        return None

    def bind_host(self, host: HostRef) -> None:
        self.host_ref = host

    @property
    def host(self) -> nn.Module:
        if self.host_ref is None:
            raise AttachError(f"{type(self).__name__}: its host module is known once the slot is installed")
        return self.host_ref.module

    def pruned_parameters(self) -> dict[str, torch.Tensor] | None:
        return None


def like(module: nn.Module) -> dict[str, Any]:
    """The device and floating dtype of a module's own (else first) parameter: where new modules should live."""
    weight = next((p for p in module.parameters(recurse=False)), None)
    if weight is None:
        weight = next(module.parameters(), None)
    if weight is None:
        return {}
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}


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


PRENORM = "_unipelt_prenorm"  # set on a post-LN site's output: the pre-norm value it normalises


def _norm_hook(slot: "Slot"):
    """Pfeiffer placement (AdapterHub). Post-LN, at the output LayerNorm: its input is z = h + residual; Δ (and a
    gate) read LN(z), the hook's output, and the same LayerNorm is applied again to z + Δ. Pre-LN, at the module
    whose output is z = h + residual: z + Δ with Δ read from z.

    Post-LN, the pre-norm value z + Δ rides on the returned tensor (attribute PRENORM), so that a second adapter's
    hook at the same LayerNorm (a Stack) composes into z + Δ, not into the module's input z. Under a Route (rows of a
    mixed batch, a BatchSplit share, a Parallel / Average block) only the routed rows change; members of a block
    all read LN of the pre-norm value the first one saw."""
    def hook(module, args, output):
        if not slot.enabled:
            return None
        if isinstance(module, nn.LayerNorm):
            def norm(t: torch.Tensor) -> torch.Tensor:
                return nn.functional.layer_norm(t, module.normalized_shape, module.weight, module.bias, module.eps)

            z = getattr(output, PRENORM, None)
            z = args[0] if z is None else z
            if slot.route is None:
                composed = slot.composer(z, slot.delta_module(output), output)
                result = norm(composed)
            else:
                def compose(h: torch.Tensor, read: torch.Tensor | None) -> torch.Tensor:
                    read = norm(h) if read is None else read
                    return slot.composer(h, slot.delta_module(read), read)

                shared = slot.route.shared is not None  # members read LN of the shared z, not this call's output
                composed = slot.route.apply(slot, z, None if shared else output, compose)
                rows = slot.route.rows_at(z.shape[0])
                if rows is None:
                    result = norm(composed)
                elif rows.numel() == 0:
                    return None
                else:
                    rows = rows.to(z.device)
                    result = output.index_copy(0, rows, norm(composed.index_select(0, rows)).to(output.dtype))
            setattr(result, PRENORM, composed)
            return result
        z = output[0] if isinstance(output, tuple) else output
        if slot.route is None:
            composed = slot.composer(z, slot.delta_module(z), z)
        else:
            composed = slot.route.apply(slot, z, None, lambda h, _: slot.composer(h, slot.delta_module(h), h))
        return (composed,) + tuple(output[1:]) if isinstance(output, tuple) else composed
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
        self._merge_record: MergeRecord | None = None  # what merge() changed, to undo it exactly
        self.host_ref: HostRef | None = None  # set by bind_host at install
        self.route: Route | None = None  # set by unipelt.adapter_set while a composition block needs it
        # True when the h this slot's hook receives is a projection's output (a fresh tensor nobody else holds):
        # a Route writes its rows into it in place instead of copying it whole (set at install)
        self._owns_output = False
        self._norm_site = False

    def bind_host(self, host: HostRef) -> None:
        """Hand the slot (and its Δh module) the live accessor to the module it lives on; attach calls it before
        install."""
        self.host_ref = host
        bind = getattr(self.delta_module, "bind_host", None)
        if bind is not None:
            bind(host)

    @property
    def enabled(self) -> bool:
        return self.active and not self.merged

    @property
    def delta_module(self) -> nn.Module:
        return getattr(self, self.FORM_ATTR)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if self.route is None:
            return self.composed(h, x)
        return self.route.apply(self, h, x)

    def route_refusal(self, route: Route | None = None) -> str | None:
        """Why this slot cannot take `route` (some rows only, or a shared h in a Parallel / Average block), or None
        when it can. Every form routed by its hooks can (a LayerNorm site included: _norm_hook)."""
        return None

    def add_into_rows(self, h: torch.Tensor, x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        """h with s·Δh added on `rows` in place, for a slot whose composition is a fixed factor s (add, a fixed
        scale) on the whole of h: what composed() gives those rows, without gathering and copying back the rows of
        h (a Route over a projection's fresh output). None where composed() does more (a gate, a learned scale, a
        fused projection's chunk, a form that composes itself)."""
        scale = self.composer.fixed_factor()
        if scale is None or self.chunk is not None or type(self).composed is not Slot.composed:
            return None
        parallel = self.spec.insertion == "parallel"
        if parallel and x is None:
            return None
        source = x.index_select(0, rows) if parallel else h.index_select(0, rows)
        delta = self.delta_module(source)
        return h.index_add_(0, rows, delta.to(h.dtype), alpha=scale)

    def composed(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """h with this slot's Δh composed in, on every row."""
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
        elif placement.kind == "norm":
            self._norm_site = True
            handles.append(h_module.register_forward_hook(_norm_hook(self)))
        else:
            self._owns_output = placement.kind == "projection"
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
        kept = pruned() if pruned is not None else None
        if kept is not None:
            tensors.update({f"{self.FORM_ATTR}.{name}": value for name, value in kept.items()})
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

    def non_finite(self) -> str | None:
        """'nan' or 'inf' when the ΔW that merge() would fold holds one (checked before anything is merged)."""
        return self.linear_map().non_finite(self.composer.merge_factor())

    def merge(self, host: nn.Module, linear: LinearMap | None = None) -> float | None:
        """Fold `linear` (default: this slot's map now) into `host`; returns the max abs rounding error for a 4-bit
        weight (requantized), else None."""
        linear = self.linear_map() if linear is None else linear
        self._merge_record, error = fold(host, linear, self.composer.merge_factor(), self.chunk,
                                         self.site in ACTIVATION_SITES)
        self.merged = True
        return error

    def unmerge(self, host: nn.Module, name: str = "") -> None:
        """Undo merge(): the original weights bit for bit (or the fold's inverse if they changed since)."""
        if self._merge_record is None:  # cannot happen through merge(); a loud error rather than a silent skip
            raise AttachError(f"unmerge: module '{name}' is marked merged but has no merge record")
        unfold(host, self._merge_record, self.chunk, self.site in ACTIVATION_SITES, name)
        self._merge_record = None
        self.merged = False


__all__ = ["Delta", "HostRef", "LinearMap", "Route", "SharedInput", "Slot", "capture_hook", "chunk_rows", "like"]
