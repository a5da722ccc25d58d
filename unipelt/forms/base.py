"""The contract of a functional form, and the registry of forms.

A form is one module under unipelt/forms/ that defines a `Form` subclass and registers one instance with
`register`. The form declares, in one place, everything the rest of the toolkit needs to know about it:

- `Options`: a frozen dataclass of the form's own YAML keys, each made with `option(default, help, check)`;
- `sites`, `insertions`, `compositions`: what it allows on the other three axes (the spec layer refuses the rest);
- `build`: the slots (and any model-level children or training controllers) for one module spec's placements;
- `count`: its parameter count in the paper's accounting (He et al. 2022, Appendix B), from placements alone;
- `size_key` / `size_cap`: how a budget resizes it (unipelt.budget);
- on the built module, `linear_map()` where Δh is linear, so that merge() can fold it.

Nothing outside a form's own module names it: the spec, attach, accounting, budget, merge and io layers go
through this contract. The form modules sit below the spec layer: they receive a module spec and its placements
but never import spec.py, attach.py or anything above them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..errors import MethodConfigError, allowed
from ..module_spec import ModuleSpec, Placement
from ..slot import Delta, HostRef, Slot

Check = Callable[[Any, str], Any]
MAX_VECTORS = 1024  # the largest prefix / prompt a budget may ask for: far beyond any setting in the literature


def option(default: Any, help: str, check: Check | None = None) -> Any:
    """A form option: its default, one line of help, and the check that validates (and normalises) a raw value."""
    return field(default=default, metadata={"help": help, "check": check})


def optional(check: Check) -> Check:
    """`check` for an option whose YAML value may also be null (None)."""
    return lambda value, where: None if value is None else check(value, where)


@dataclass(frozen=True)
class Counts:
    """One module spec's parameters in the paper's accounting: `added` as saved and served, `reparam` the
    training-only reparameterisation (prefix MLP, prompt encoder), `trainable` what the optimizer updates."""

    added: int = 0
    reparam: int = 0
    trainable: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.added + other.added, self.reparam + other.reparam, self.trainable + other.trainable)


@dataclass
class PeftLora:
    """One slot as Hugging Face PEFT's LoRA on its projection: Δh = scale·B·A·x, plus what a LoRA variant adds.

    `config`: the LoraConfig values the slot needs (e.g. {"use_dora": True}; every module of one file must agree);
    `tensors`: further tensors of the module by PEFT's key suffix (DoRA: "lora_magnitude_vector"); `stackable`:
    whether several such modules (chunks of a fused projection, two modules on one projection) may be written as
    one LoRA of the summed rank (true of a plain LoRA, not of a variant that normalises the whole weight)."""

    a: torch.Tensor  # r x d_in
    b: torch.Tensor  # d_out x r
    scale: float
    config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    stackable: bool = True


@dataclass
class Built:
    """What a form builds for one module spec: one slot per placement, in the placements' order, plus children
    registered on the model itself (e.g. a prefix MLP shared by the layers of one attention kind) and training
    controllers (e.g. an AdaLoRA rank allocator), both by name."""

    slots: list[nn.Module]
    children: dict[str, nn.Module] = field(default_factory=dict)
    controllers: dict[str, Any] = field(default_factory=dict)


class Form:
    """Base class of every functional form; see the module docstring. Subclasses set the class attributes."""

    name: ClassVar[str]
    Options: ClassVar[type]
    sites: ClassVar[tuple[str, ...]]
    insertions: ClassVar[tuple[str, ...]]
    compositions: ClassVar[tuple[str, ...]]
    # False: the form acts once on the input sequence, so `layers` and `stacks` do not apply.
    per_layer: ClassVar[bool] = True
    # The option a budget scales (None: the form has no size), and options that follow it in proportion.
    size_key: ClassVar[str | None] = None
    size_companions: ClassVar[tuple[str, ...]] = ()
    # Options that training fills in (AdaLoRA's pruned ranks, written into the saved method): like the size, they
    # follow from the budget, so a report must not split runs by them.
    solved_keys: ClassVar[tuple[str, ...]] = ()
    # The module the slot lives on: "h" (the module whose output or input it modifies) or "x" (the module it acts
    # through: the attention module for a prefix, the base model for a prompt).
    host: ClassVar[str] = "h"
    # Set (to the advice shown) when a method may hold at most one module of this form.
    once_per_method: ClassVar[str | None] = None
    # PEFT LoRA files this form reads back (import_peft): the LoraConfig values such a file must have, e.g.
    # {"use_dora": False}; None: import_peft never builds this form.
    peft_lora_reads: ClassVar[Mapping[str, Any] | None] = None
    # Tensors besides lora_A / lora_B that such a file holds per target module, by key suffix (DoRA's
    # "lora_magnitude_vector"); import_peft hands them to peft_lora_load.
    peft_lora_tensors: ClassVar[tuple[str, ...]] = ()

    # ---- options --------------------------------------------------------------------------------------------

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.Options))

    def option_help(self) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(self.Options)}

    def parse(self, raw: Mapping[str, Any], where: str) -> Any:
        """The typed options of a raw module mapping (its form keys only; the axes are read by the spec layer)."""
        values = {}
        for f in dataclasses.fields(self.Options):
            if f.name in raw:
                check = f.metadata.get("check")
                values[f.name] = check(raw[f.name], f"{where}: {f.name}") if check else raw[f.name]
        options = self.Options(**values)
        self.check(options, where)
        return options

    def check(self, options: Any, where: str) -> None:
        """Checks across options (and against nothing else); raise MethodConfigError naming the key."""

    def finish_module(self, spec: "ModuleSpec", raw: Mapping[str, Any], where: str) -> "ModuleSpec":
        """The validated module spec: checks that involve the axes too (an option that only makes sense with one
        composition), and axis values an option implies (`raw`: the module as written); default: unchanged."""
        return spec

    def finish_yaml(self, spec: "ModuleSpec", entry: dict[str, Any]) -> None:
        """Adjust a module's YAML entry in place (drop an axis value an option implies); default: nothing."""

    def to_yaml(self, options: Any) -> dict[str, Any]:
        """The options as load_method reads them back: nulls left out, tuples as lists."""
        out = {}
        for f in dataclasses.fields(self.Options):
            value = getattr(options, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def folded(self, options: Any) -> Any:
        """The options once training aids are folded away (what is saved and served); default: unchanged."""
        return options

    def with_size(self, options: Any, size: int) -> Any:
        """The options with the size key set to `size` (companions follow in proportion, see budget.py)."""
        changes = {self.size_key: size}
        old = getattr(options, self.size_key)
        for companion in self.size_companions:
            changes[companion] = max(1, min(size, getattr(options, companion) * size // old))
        return dataclasses.replace(options, **changes)

    # ---- on a model -----------------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, spec: "ModuleSpec", where: str) -> "ModuleSpec":
        """The spec with anything that needs the model resolved (e.g. texts to token ids); default: unchanged."""
        return spec

    def build(self, spec: "ModuleSpec", placements: list["Placement"], model: nn.Module,
              modules: dict[str, nn.Module]) -> Built:
        raise NotImplementedError

    def count(self, spec: "ModuleSpec", placements: list["Placement"]) -> Counts:
        raise NotImplementedError

    # ---- what the shared tester and the reports may rely on ------------------------------------------------

    def merges(self, spec: "ModuleSpec") -> bool:
        """True when merge() folds every slot of this module into the base weights (nothing keeps running as a
        module); the shared tester holds merge() to it on every family. Default False."""
        return False

    def starts_as_identity(self, spec: "ModuleSpec") -> bool:
        """True when the attached model computes exactly the base model's outputs until training moves the
        module (e.g. LoRA's zero B); the shared tester holds attach to it. Default False."""
        return False

    def uses_adapters(self, spec: "ModuleSpec") -> tuple[str, ...]:
        """The named adapters this module runs itself (AdapterFusion's members): they must be attached before it,
        cannot be deleted or renamed while it exists, and cannot act on the same rows as it. Default none."""
        return ()

    def attached_counts(self, deltas: list[nn.Module]) -> dict[str, int]:
        """Extra entries for count_parameters of an attached model, from this form's Δh modules of one method
        (e.g. AdaLoRA's current total rank); summed over modules of the same form. Default none."""
        return {}

    # ---- Hugging Face PEFT's LoRA files (export_peft / import_peft) ------------------------------------------

    def peft_lora_export(self, slot: Slot) -> "PeftLora | str":
        """The slot as a PEFT LoRA, or why it cannot be one (one phrase, named in export_peft's refusal)."""
        return f"form '{self.name}' has no PEFT LoRA equivalent"

    def peft_lora_module(self, rank: int, scale: float, dropout: float) -> dict[str, Any]:
        """import_peft: the module keys (form, options, insertion, compose, scale) of a module that computes a PEFT
        LoRA of this rank and scale; a form with `peft_lora_reads` implements it."""
        raise NotImplementedError(f"form '{self.name}' does not import PEFT LoRA files")

    def peft_lora_load(self, slot: Slot, lora: "PeftLora", chunk: tuple[int, int] | None) -> None:
        """import_peft: copy a PEFT LoRA's tensors (A, B and the variant's own, as in the file) into the slot built
        by peft_lora_module. `chunk`: the slot modifies one slice (index, count) of a fused projection's output
        rows (unipelt.slot.chunk_rows gives them), so it takes the matching rows of B (and of row-wise tensors)."""
        raise NotImplementedError(f"form '{self.name}' does not import PEFT LoRA files")

    def input_tokens(self, options: Any) -> int:
        """Positions this form adds to every input sequence (a prompt's virtual tokens), which the sequence
        length a model accepts must leave room for; default 0."""
        return 0

    def size_cap(self, placements: list["Placement"]) -> int:
        """The largest size that still makes sense: default the narrowest width the module maps (low rank)."""
        widths = [p.head_dim if p.kind == "heads" else min(p.d_in, p.d_out) for p in placements]
        return max(1, min(widths)) if widths else 1


FORMS: dict[str, Form] = {}


class AlphaScaledForm(Form):
    """A form whose `alpha` option sets compose scale's factor to alpha / its size key (LoRA's lora_alpha / r), so
    the factor follows the size a budget solves; the scale is then implied, and left out of the YAML."""

    def finish_module(self, spec: "ModuleSpec", raw: Mapping[str, Any], where: str) -> "ModuleSpec":
        alpha = spec.options.alpha
        if alpha is None:
            return spec
        if "scale" in raw or spec.compose != "scale":
            raise MethodConfigError(f"{where}: alpha sets the scale (alpha / {self.size_key}): use it with compose "
                                    "'scale' and without 'scale'")
        return spec.replace(scale=alpha / getattr(spec.options, self.size_key))

    def finish_yaml(self, spec: "ModuleSpec", entry: dict[str, Any]) -> None:
        if spec.options.alpha is not None:
            entry.pop("scale", None)  # alpha / size gives it back


def register(form: Form) -> Form:
    if form.name in FORMS:
        raise ValueError(f"form '{form.name}' is registered twice")
    FORMS[form.name] = form
    return form


def form_of(name: str) -> Form:
    if name not in FORMS:
        raise MethodConfigError(f"form: unknown value {name!r} (allowed: {allowed(FORMS)})")
    return FORMS[name]


__all__ = ["MAX_VECTORS", "AlphaScaledForm", "Built", "Counts", "Delta", "FORMS", "Form", "HostRef", "PeftLora",
           "form_of", "option", "optional", "register"]
