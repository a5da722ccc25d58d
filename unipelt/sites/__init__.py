"""Sites (the modified representation): the site vocabulary (names.py), where each site lives per model family
(table.py), how the families store linear maps (linear.py) and what identifies a base model (identity.py).
Everything this toolkit knows about a model family is here. Resolving a method on a model: unipelt.placement."""

from .linear import is_transposed, linear_dims
from .table import FAMILIES, family_of

__all__ = ["FAMILIES", "family_of", "is_transposed", "linear_dims"]
