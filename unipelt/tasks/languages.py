"""Language codes for multilingual translation models (mBART, mBART-50, M2M100, NLLB): the tokenizer writes the
source code into every source and the target code into every target, and generation must start in the target
language the way training showed it.

Where the code goes is read from the tokenizer itself, on one probe target:
- at the end (mBART-cc25: `tokens </s> ro_RO`): the model's own label shift moves the code to the front of the
  decoder input, so generation starts from it (`decoder_start_token_id` = the code), as the reference run_translation.py
  sets for mBART;
- at the front (mBART-50, M2M100, NLLB: `ro_RO tokens </s>`): the decoder starts from its usual start token and the
  code is forced as the first generated token (`forced_bos_token_id`)."""

from __future__ import annotations

import copy
from typing import Any

from ..errors import DataError
from .config import TaskConfig


def with_languages(task: TaskConfig, tokenizer: Any) -> tuple[Any, dict[str, int]]:
    """A copy of `tokenizer` set to the task's source/target codes and the generate() keyword that starts in the
    target language; the tokenizer unchanged and {} when the task sets no codes or the tokenizer has none."""
    if task.source_lang is None or not hasattr(tokenizer, "src_lang"):
        return tokenizer, {}
    where = f"task '{task.name}'"
    unknown = tokenizer.unk_token_id
    for key in ("source_lang", "target_lang"):
        code = getattr(task, key)
        found = tokenizer.convert_tokens_to_ids(code)
        if found is None or found == unknown:
            raise DataError(f"{where}: {key} '{code}' is not a language code of tokenizer "
                            f"{type(tokenizer).__name__}")
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own languages
    tokenizer.src_lang = task.source_lang
    tokenizer.tgt_lang = task.target_lang
    code = tokenizer.convert_tokens_to_ids(task.target_lang)
    probe = tokenizer(text_target="x")["input_ids"]
    if probe and probe[-1] == code:
        return tokenizer, {"decoder_start_token_id": code}
    if probe and probe[0] == code:
        return tokenizer, {"forced_bos_token_id": code}
    raise DataError(f"{where}: tokenizer {type(tokenizer).__name__} does not mark targets with target_lang "
                    f"'{task.target_lang}' (a probe target became {probe})")


__all__ = ["with_languages"]
