"""compat.unwrap_compiled / accepts_compiled: the one place that knows torch.compile's wrapper (OptimizedModule and
its `_orig_mod`), so every unipelt function can take a compiled model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unipelt import compat
from unipelt.errors import AttachError


def _compiled(module: nn.Module) -> nn.Module:
    return torch.compile(module, backend="aot_eager")  # wrapping compiles nothing until the first call


def test_unwrap_compiled_gives_the_model_inside_and_anything_else_as_it_is():
    model = nn.Linear(2, 2)
    compiled = _compiled(model)
    assert type(compiled).__name__ == "OptimizedModule" and compat.is_compiled(compiled)
    assert compat.unwrap_compiled(compiled) is model
    for other in (model, None, "a config", 3):
        assert compat.unwrap_compiled(other) is other
        assert not compat.is_compiled(other)


def test_a_wrapper_of_a_wrapper_unwraps_to_the_model():
    model = nn.Linear(2, 2)
    outer = _compiled(nn.Linear(2, 2))
    outer._modules["_orig_mod"] = _compiled(model)  # as a framework that wraps a compiled model again might
    assert compat.unwrap_compiled(outer) is model


def test_a_wrapper_without_its_model_is_one_line():
    compiled = _compiled(nn.Linear(2, 2))
    del compiled._modules["_orig_mod"]
    with pytest.raises(AttachError, match=r"^a torch.compile'd OptimizedModule without its '_orig_mod' module "
                                          r"\(torch .*\); pass the model itself$"):
        compat.unwrap_compiled(compiled)


def test_accepts_compiled_runs_on_the_model_inside_and_hands_back_what_it_was_given():
    seen = []

    @compat.accepts_compiled
    def attach_like(model, value=0):
        seen.append(model)
        return model

    @compat.accepts_compiled
    def count_like(model, value=0):
        seen.append(model)
        return {"value": value}

    model = nn.Linear(2, 2)
    compiled = _compiled(model)
    assert attach_like(compiled, value=1) is compiled  # the caller keeps its compiled model
    assert attach_like(model) is model
    assert attach_like(model=compiled) is compiled
    assert count_like(compiled, 5) == {"value": 5}
    assert seen == [model, model, model, model]
    assert attach_like.__name__ == "attach_like"
