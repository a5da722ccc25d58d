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
from tiny_models import DECODERS, ENCODER_DECODERS, FAMILIES, has_biases, tiny_batch, tiny_model, perturb_adapter
from unipelt.spec import preset_dir

PRESETS = [p for p in unipelt.list_presets() if p != "full"]  # full fine-tuning cannot share a base
CASES = [(family, preset) for family in FAMILIES for preset in PRESETS
         if not (preset == "bitfit" and not has_biases(family))]
ROWS = ["a", None, "b", "c", "a"]  # row -> adapter; rows 1 and 2 are padded (right), by 2 and 3 positions
LAYERS = {"bert": 2, "roberta": 2, "gpt2": 2, "llama": 2, "gemma": 2, "bart": 4, "t5": 4}  # both stacks


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
        perturb_adapter(model, name, 11 + order.index(name))


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
        if key in _ALONE:  # the LoRA beside every preset is the same: built once a family
            alone[name] = _ALONE[key]
            continue
        alone[name] = copy.deepcopy(base)
        attach_as(alone[name], needs, adapters)
        if key is not None:
            _ALONE[key] = alone[name]
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
    """docs/testing.md's count for another batch shape: every matmul of every layer (up to 9 a layer, 6 more for
    a decoder layer's cross-attention) and the head."""
    layers = LAYERS[family]
    return 9 * layers + (6 * layers // 2 if family in ENCODER_DECODERS else 0) + 1


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


# ---- generate ------------------------------------------------------------------------------------------------

GENERATE_ADAPTERS = {  # prompts of two lengths, a prefix, UniPELT (gated prefix, Pfeiffer at ffn.ln, LoRA), a LoRA
    "p": {"name": "p", "modules": [{"form": "prompt", "at": "embeddings", "insertion": "parallel",
                                    "compose": "gate", "length": 4, "init": "vocab"}]},
    "q": {"name": "q", "modules": [{"form": "prompt", "at": "embeddings", "insertion": "parallel",
                                    "compose": "gate", "length": 2, "init": "random"}]},
    "x": {"name": "x", "modules": [{"form": "prefix", "at": ["attn.heads", "cross_attn.heads"],
                                    "insertion": "parallel", "compose": "gate", "length": 3}]},
    "u": "unipelt",
    "l": "lora",
}
GENERATE_ROWS = ["p", None, "q", "x", "u", "l"]
STEPS = 4


@functools.lru_cache(maxsize=None)
def generating(family: str):
    """The model with GENERATE_ADAPTERS and each adapter alone on a copy of the base (same weights)."""
    base = base_of(family)
    model = copy.deepcopy(base)
    attach_as(model, list(GENERATE_ADAPTERS), GENERATE_ADAPTERS)
    alone = {None: base}
    for name in GENERATE_ADAPTERS:
        alone[name] = copy.deepcopy(base)
        attach_as(alone[name], [name], GENERATE_ADAPTERS)
    return model.eval(), alone


def prompts(family: str) -> dict:
    """Unequal real lengths: a decoder's row 2 left-padded (as generation wants), an encoder input right-padded."""
    batch = tiny_batch(family, batch=len(GENERATE_ROWS), length=6, padded=False)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if family in ENCODER_DECODERS:
        batch["attention_mask"][2, -2:] = 0
    else:
        batch["attention_mask"][2, :2] = 0
    return batch


def generate(model, batch: dict, beams: int):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, num_beams=beams,
                              output_scores=True, output_logits=True, return_dict_in_generate=True)


CACHED = ("the row runs in a batch of 6 rows, prompts padded to the longest at their right end: every matmul of "
          "every layer and of the head, on another shape, at the first call and at each cached step")


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("family", DECODERS + ENCODER_DECODERS)
def test_generate_rows_equal_each_adapter_alone(family, beams):
    model, alone = generating(family)
    batch = prompts(family)
    with unipelt.mixed_batch(model, GENERATE_ROWS):
        mixed = generate(model, batch, beams)
    first_plain = None
    for index, name in enumerate(GENERATE_ROWS):
        expected = generate(alone[name], row(batch, index), beams)
        assert torch.equal(mixed.sequences[index], expected.sequences[0]), f"row {index} ({name})"
        if beams == 1:  # every step's logits of the row against the row alone
            got = torch.stack([step[index] for step in mixed.logits])
            want = torch.stack([step[0] for step in expected.logits])
            assert_close_scaled(got, want, ops=STEPS * ops_of(family), reason=CACHED, msg=f"row {index} ({name})")
            if name is None:
                first_plain = want
            elif first_plain is not None:
                assert_differs(want, first_plain, ops=STEPS * ops_of(family), reason="the adapter's own Δh")
        else:
            assert_close_scaled(mixed.sequences_scores[index], expected.sequences_scores[0],
                                ops=STEPS * ops_of(family), reason=CACHED, msg=f"row {index} ({name})")


# ---- prompts beside gates, BatchSplit, Parallel / Average of prefixes, refusals ---------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_of_two_lengths_beside_gated_adapters(family):
    """Rows of two prompt lengths beside UniPELT's gates (a mean over the row's own tokens: the padding the
    longer prompt adds to the other rows is not counted), a prefix, a LoRA and the base."""
    model, alone = generating(family)
    batch = padded_batch(family)
    batch = {key: torch.cat([value, value[:1]]) for key, value in batch.items()}  # 6 rows
    with unipelt.mixed_batch(model, GENERATE_ROWS):
        mixed = logits(model, batch)
    for index, name in enumerate(GENERATE_ROWS):
        expected = logits(alone[name], row(batch, index))
        assert_close_scaled(mixed[index:index + 1], expected, ops=ops_of(family), reason=BATCH_SHAPE,
                            msg=f"row {index} ({name})")


def test_batch_split_of_two_prompts_and_a_prefix():
    """Two prompt adapters may share a batch when a BatchSplit keeps their rows apart (refused on the same rows)."""
    model, alone = generating("gpt2")
    batch = padded_batch("gpt2")
    names = ["p", "p", "q", "x", "x"]
    unipelt.set_active(model, unipelt.BatchSplit("p", "q", "x", sizes=[2, 1, 2]))
    try:
        split = logits(model, batch)
    finally:
        unipelt.set_active(model, "l")
    for index, name in enumerate(names):
        assert_close_scaled(split[index:index + 1], logits(alone[name], row(batch, index)), ops=ops_of("gpt2"),
                            reason=BATCH_SHAPE, msg=f"row {index} ({name})")
    with pytest.raises(unipelt.AttachError, match="'p' and 'q' both insert virtual tokens"):
        unipelt.set_active(model, unipelt.BatchSplit(unipelt.Stack("p", "q"), "x", sizes=[3, 2]))
    assert unipelt.active_adapters(model) == "l"


def attention_output(model, batch) -> torch.Tensor:
    """The first layer's attention output (its input, the embeddings, is the same whatever the adapters do)."""
    seen = []
    handle = model.transformer.h[0].attn.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    try:
        logits(model, batch)
    finally:
        handle.remove()
    return seen[0]


def test_parallel_and_average_of_prefixes():
    """A prefix in a Parallel / Average block adds weight·(Attn with it − Attn without it): at the first layer (same
    input for every composition) the output is that linear combination of each prefix alone's, c_proj included."""
    model, _ = generating("gpt2")
    torch.manual_seed(4)
    unipelt.attach(model, {"name": "y", "modules": [{"form": "prefix", "at": "attn.heads", "insertion": "parallel",
                                                     "compose": "add", "length": 2}]}, name="y")
    perturb_adapter(model, "y", 20)
    batch = padded_batch("gpt2")
    try:
        with unipelt.disabled(model):
            plain = attention_output(model, batch)
        single = {}
        for name in ("x", "y"):
            unipelt.set_active(model, name)
            single[name] = attention_output(model, batch)
        for block, w in ((unipelt.Parallel("x", "y"), (1.0, 1.0)),
                         (unipelt.Average("x", "y", weights=[0.7, 0.3]), (0.7, 0.3)),
                         (unipelt.Average("x", "y", weights=[1.0, 0.0]), (1.0, 0.0))):
            unipelt.set_active(model, block)
            expected = plain + w[0] * (single["x"] - plain) + w[1] * (single["y"] - plain)
            assert_close_scaled(attention_output(model, batch), expected, ops=4, scale=float(plain.abs().max()),
                                reason="the weighted differences summed before c_proj here, after it by hand, over "
                                       "terms of the plain output's size", msg=str(block))
        assert_differs(single["x"], plain, ops=4, reason="the prefix's own change")
    finally:
        unipelt.delete_adapter(model, "y")
        unipelt.set_active(model, "l")


def test_refused_compositions_are_one_line_and_change_nothing():
    model, _ = generating("gpt2")
    unipelt.set_active(model, "l")
    with pytest.raises(unipelt.AttachError, match=r"^set_active: adapter 'p' cannot take part in this composition: "
                                                  r"virtual tokens join the input sequence; they have no Δh that an "
                                                  r"Average weight \(0.5\) could scale$"):
        unipelt.set_active(model, unipelt.Average("p", "l"))
    torch.manual_seed(5)
    unipelt.attach(model, {"name": "h", "modules": [{"form": "bottleneck", "at": "attn.heads", "dim": 4,
                                                     "insertion": "sequential", "compose": "add",
                                                     "activation": "relu"}]}, name="h")
    try:
        with pytest.raises(unipelt.AttachError, match=r"^set_active: adapter 'x' cannot take part in this "
                                                      r"composition: a prefix acts inside the attention, before the "
                                                      r"bottleneck module at the same site \('attn.heads'\) reads h"):
            unipelt.set_active(model, unipelt.Parallel("x", "h"))
        assert unipelt.active_adapters(model) == "h"
    finally:
        unipelt.delete_adapter(model, "h")
        unipelt.set_active(model, "l")
