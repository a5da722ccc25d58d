"""What attach changes on a model, recorded before it starts so that a failure half-way puts everything back.

attach is all or nothing: a form that raises while its slots are being installed (or a quantization that fails at
the 14th layer) must leave the model exactly as it was -- module tree, parameters and buffers, hooks, the config
object each module holds (a prefix routes attention through a shadow config), `requires_grad` flags and the
train/eval mode. The snapshot holds references and flags, not copies of weights: attach replaces modules and adds
hooks and children, but never writes into a base weight in place.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# The hook dictionaries of torch.nn.Module; a hook registered during the failed attach is removed from them.
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")
# Attributes a form may swap on a base module (the prefix's shadow config); restored by identity.
SWAPPED_ATTRIBUTES = ("config",)
_ABSENT = object()


class ModelSnapshot:
    """The structure of a model at one moment; `restore()` brings the model back to it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), m.training,
                         {d: list(getattr(m, d, {}) or {}) for d in HOOK_DICTS},
                         {a: m.__dict__.get(a, _ABSENT) for a in SWAPPED_ATTRIBUTES})
                        for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.dict_keys = set(model.__dict__)

    def restore(self) -> None:
        """Put back every module's children, parameters, buffers, hooks, mode and swapped attributes as they were
        (modules added since are dropped, modules replaced since come back), and every `requires_grad`."""
        for module, children, params, buffers, training, hooks, swapped in self.modules:
            for table, saved in ((module._modules, children), (module._parameters, params),
                                 (module._buffers, buffers)):
                table.clear()
                table.update(saved)
            module.training = training
            for name, ids in hooks.items():
                registered = getattr(module, name, None)
                if registered is None:
                    continue
                for key in [k for k in registered if k not in set(ids)]:
                    del registered[key]
            for name, value in swapped.items():
                _put_back(module, name, value)
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for key in set(self.model.__dict__) - self.dict_keys:
            del self.model.__dict__[key]


def _put_back(module: nn.Module, name: str, value: Any) -> None:
    if value is _ABSENT:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = value


__all__ = ["ModelSnapshot"]
