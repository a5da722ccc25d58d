"""Mixed-adapter batches (unipelt.mixed_batch): one adapter per row, None for the base. For every preset on every
tiny family, a batch whose rows go to three adapters (the preset, the preset again with other weights and, for
prefixes and prompts, another length, and a LoRA) and to the base gives each row what that row gives alone through
a copy of the base with only its adapter, on the same weights; generate() too, greedy with a KV cache and with
beams. Rows of different prompt lengths are padded to the longest, at their right end, masked."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import yaml

import unipelt
from numerics import assert_close_scaled, assert_differs
from tiny_models import DECODERS, ENCODER_DECODERS, FAMILIES, has_biases, tiny_batch, tiny_model
from unipelt.spec import preset_dir

PRESETS = [p for p in unipelt.list_presets() if p != "full"]  # full fine-tuning cannot share a base
CASES = [(family, preset) for family in FAMILIES for preset in PRESETS
         if not (preset == "bitfit" and not has_biases(family))]
ROWS = ["a", None, "b", "c", "a"]  # row -> adapter; rows 1 and 2 are padded (right), by 2 and 3 positions
LAYERS = {"bert": 2, "roberta": 2, "gpt2": 2, "llama": 2, "gemma": 2, "bart": 4, "t5": 4}


def variant(preset: str) -> dict:
    """The preset with every prefix and prompt shorter (another length than the preset's own: rows of two prompt
    lengths in one batch); other presets unchanged (the second adapter differs by its weights)."""
    raw = yaml.safe_load(Path(preset_dir(), f"{preset}.yaml").read_text())
    raw["name"] = f"{raw['name']}_short"
    for module in raw["modules"]:
        if module["form"] == "prefix":
            module["length"] = 4
        if module["form"] == "prompt":
            module["length"] = 5
            if "template" in module:
                module["template"] = ["input_first", {"prompt": 2}, "input_rest", {"prompt": 3}]
    return raw


def plan_of(preset: str) -> tuple[dict[str, object], list]:
    """The adapters (name -> method, attached in this order) and the row -> adapter list of a preset's case."""
    if preset == "adapter_fusion":  # a fusion runs its member adapters: two Pfeiffer adapters beside it
        return {"a": "pfeiffer", "b": "pfeiffer", "f": preset}, ["f", None, "a", "b", "f"]
    lora = "qlora" if preset == "qlora" else "lora"  # adapters of one model share one base: 4-bit or not
    return {"a": preset, "b": variant(preset), "c": lora}, ROWS


@functools.lru_cache(maxsize=None)
def base_of(family: str):
    return tiny_model(family)  # never changed: adapters go on copies


_ALONE: dict = {}


def attach_as(model, names: list[str], adapters: dict[str, object]) -> None:
    """Attach `names` (seeded by their place in the case, perturbed), the last one active."""
    order = list(adapters)
    for name in names:
        torch.manual_seed(order.index(name) + 1)
        unipelt.attach(model, adapters[name], name=name)
        perturb(model, name, 11 + order.index(name))


def build(family: str, preset: str):
    """The model with the case's adapters and, per name, a copy of the base with only that adapter (a fusion: with
    its members, off), on the same weights (same seeds, same perturbation); None -> the base itself."""
    base = base_of(family)
    adapters, rows = plan_of(preset)
    model = copy.deepcopy(base)
    attach_as(model, list(adapters), adapters)
    alone = {None: base}
    for name, method in adapters.items():
        needs = list(adapters) if method == "adapter_fusion" else [name]
        key = (family, method, name) if isinstance(method, str) and method in ("lora", "qlora") else None
        if key is None or key not in _ALONE:  # the LoRA beside every preset is the same: built once a family
            alone[name] = copy.deepcopy(base)
            attach_as(alone[name], needs, adapters)
            if key is not None:
                _ALONE[key] = alone[name]
        alone[name] = _ALONE.get(key, alone[name])
    if preset == "qlora":  # QLoRA's base is the 4-bit one: a QLoRA copy, not moved off init, its adapter off
        alone[None] = copy.deepcopy(base)
        unipelt.attach(alone[None], "qlora")
    return model, alone, rows


def padded_batch(family: str) -> dict:
    batch = tiny_batch(family, batch=len(ROWS))
    batch["attention_mask"][2, 4:] = 0
    if family not in ENCODER_DECODERS and family not in ("bert", "roberta"):
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def row(batch: dict, index: int) -> dict:
    return {key: value[index:index + 1] for key, value in batch.items()}


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def alone_logits(alone: dict, name: str | None, batch: dict) -> torch.Tensor:
    """The row through the base with only its adapter; for None, the base."""
    if name is None and unipelt.is_attached(alone[None]):
        with unipelt.disabled(alone[None]):
            return logits(alone[None], batch)
    return logits(alone[name], batch)


def ops_of(family: str) -> int:
    """Every matmul of every layer (up to 9 of the base's, 6 more for a decoder's cross-attention, and those of
    the adapters acting there) and the head."""
    return 16 * LAYERS[family] + 1


BATCH_SHAPE = ("the row runs inside a batch of 5 rows, padded at its right end to the longest prompt: every matmul "
               "of every layer and of the head, and each attention, run on another shape than the row alone")


@pytest.mark.parametrize("family,preset", CASES)
def test_rows_equal_each_adapter_alone(family, preset):
    model, alone, rows = build(family, preset)
    batch = padded_batch(family)
    model.eval()
    with unipelt.mixed_batch(model, rows):
        mixed = logits(model, batch)
    plain = alone_logits(alone, None, batch)
    for index, name in enumerate(rows):
        expected = alone_logits(alone, name, row(batch, index))
        assert_close_scaled(mixed[index:index + 1], expected, ops=ops_of(family), reason=BATCH_SHAPE,
                            msg=f"row {index} ({name})")
        if name is not None:  # the adapter matters on its row: a route that skipped it would fail above
            assert_differs(expected, plain[index:index + 1], ops=ops_of(family), reason="the adapter's own Δh")
