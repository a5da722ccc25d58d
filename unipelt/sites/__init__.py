"""Sites (the modified representation): where each site lives per model family, and resolution on a model."""

from .resolve import Placement, family_of, linear_dims, resolve
from .table import FAMILIES

__all__ = ["FAMILIES", "Placement", "family_of", "linear_dims", "resolve"]
