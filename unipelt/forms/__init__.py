"""Functional forms: how Δh is computed. A form is one module here (or one package, for the prefix and the prompt,
which bring their own attention routing and input layout) that subclasses `Form` and registers itself; see
base.py for the contract. Every module of this package is imported here, so a new form is one new file."""

from __future__ import annotations

import importlib
import pkgutil

from .base import (FORMS, MAX_VECTORS, AlphaScaledForm, Built, Counts, Delta, Form, HostRef, PeftLora, form_of, option,
                   optional, register)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FORMS", "MAX_VECTORS", "AlphaScaledForm", "Built", "Counts", "Delta", "Form", "HostRef", "PeftLora",
           "form_of", "option", "optional", "register"]
