"""Functional forms: how Δh is computed. A new form is one small module here plus its spec options."""

from .bottleneck import Bottleneck, HeadBottleneck
from .prefix import Prefix, PrefixReparam
from .prompt import PromptEncoder, VirtualTokens

__all__ = ["Bottleneck", "HeadBottleneck", "Prefix", "PrefixReparam", "PromptEncoder", "VirtualTokens"]
