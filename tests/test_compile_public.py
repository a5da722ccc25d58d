"""Every public unipelt function takes a torch.compile'd model (torch.compile, Trainer(torch_compile=True) and
accelerate's unwrap_model hand back the OptimizedModule wrapper): attach, a training step through the optim contract,
save, load, merge, unmerge, export / import PEFT, counting, disabled, the named-adapter calls and detach, all on the
wrapper, which keeps computing what the model inside computes (compat.unwrap_compiled is the one place that knows
the wrapper's names)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unipelt
from numerics import assert_close_scaled, assert_differs, assert_same
from tiny_models import tiny_batch, tiny_model

AOT = "aot_eager may decompose a composite op in each layer and in the head"


def _model():
    model = tiny_model("llama")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _logits(call, batch):
    with torch.no_grad():
        return call(**batch).logits


@pytest.mark.slow  # about 30 s: every change of the adapters recompiles
def test_every_public_function_takes_a_compiled_model(tmp_path):
    torch._dynamo.reset()
    batch = tiny_batch("llama")
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    ops = model.config.num_hidden_layers + 1

    assert unipelt.attach(compiled, "lora") is compiled  # in place, on the model inside; the wrapper handed back
    assert unipelt.is_attached(compiled) and unipelt.is_attached(model)
    assert unipelt.count_parameters(compiled) == unipelt.count_parameters(model)
    assert unipelt.list_adapters(compiled) == ["default"] and unipelt.active_adapters(compiled) == "default"

    groups = unipelt.param_groups(compiled, lr=1e-2)
    names = [name for group in groups for name in group["names"]]
    assert names and not any(name.startswith("_orig_mod.") for name in names)  # the model's own names
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    compiled.train()
    loss = compiled(**batch).loss
    extra = unipelt.regularization_loss(compiled)
    (loss if extra is None else loss + extra).backward()
    optimizer.step()
    unipelt.on_optimizer_step(compiled, 1, 1)
    optimizer.zero_grad()
    assert isinstance(unipelt.training_metrics(compiled), dict)
    compiled.eval()

    trained = _logits(compiled, batch)
    assert_close_scaled(trained, _logits(model, batch), ops=ops, reason=AOT)
    with unipelt.disabled(compiled):
        base = _logits(compiled, batch)
    assert_differs(trained, base, ops=ops, reason="one AdamW step of lr 1e-2 moved LoRA's B off zero")

    unipelt.save_adapter(compiled, tmp_path / "adapter")
    unipelt.export_peft(compiled, tmp_path / "peft")
    report = unipelt.merge(compiled)
    assert report["merged"] and not report["unmerged"]
    merge_ops = 2 * len(report["merged"]) + ops
    assert_close_scaled(_logits(compiled, batch), trained, ops=merge_ops,
                        reason=f"W + s·BA, and (W + s·BA)·x against W·x + s·B(A·x), at each merged slot; {AOT}")
    unipelt.unmerge(compiled)
    unipelt.set_active(compiled, "default")
    unipelt.rename_adapter(compiled, "default", "mine")
    assert unipelt.list_adapters(compiled) == ["mine"]
    unipelt.delete_adapter(compiled, "mine")
    assert not unipelt.is_attached(compiled) or unipelt.list_adapters(compiled) == []

    assert unipelt.load_adapter(compiled, tmp_path / "adapter") is compiled
    assert_same(_logits(compiled, batch), trained)  # the same tensors in the same modules, the same graph
    unipelt.detach(compiled)
    assert not unipelt.is_attached(compiled)
    assert_close_scaled(_logits(compiled, batch), base, ops=ops, reason=AOT)

    unipelt.import_peft(compiled, tmp_path / "peft")
    assert_close_scaled(_logits(compiled, batch), trained, ops=2 * model.config.num_hidden_layers + ops,
                        reason=f"the exported LoRA is the same map, its B·A products re-associated; {AOT}")
    unipelt.detach(compiled)

    unipelt.attach(compiled, "prefix")
    before = _logits(compiled, batch)
    unipelt.fold_prefixes(compiled)
    assert_close_scaled(_logits(compiled, batch), before, ops=ops,
                        reason=f"the folded prefix vectors are the MLP's outputs, computed once; {AOT}")
    unipelt.detach(compiled)
    assert not unipelt.is_attached(model)
