"""The optimizer a method asks for (`method.optimizer`): torch's AdamW, or bitsandbytes' 8-bit / paged AdamW
(QLoRA's paged 8-bit AdamW keeps optimizer state in 8 bits and pages it to CPU memory under pressure)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnipeltError, allowed

# method.optimizer -> bitsandbytes.optim class name (None: torch.optim.AdamW)
BNB_OPTIMIZERS = {"adamw": None, "adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw_32bit": "PagedAdamW32bit"}


def make_optimizer(name: str | None, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over `groups` (each with its own lr / weight decay) in the flavour `name` (None: plain AdamW)."""
    class_name = BNB_OPTIMIZERS.get(name or "adamw", "unknown")
    if class_name == "unknown":
        raise UnipeltError(f"method.optimizer: unknown value '{name}' (allowed: {allowed(BNB_OPTIMIZERS)})")
    if class_name is None:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UnipeltError(f"method.optimizer '{name}' needs bitsandbytes: pip install 'unipelt[qlora]'") from None
    return getattr(bnb.optim, class_name)(groups, lr=lr, betas=betas, eps=eps)
