"""Offline word-level tokenizers shaped like each family's real one (special tokens, ids and templates), small
enough for the tiny models of tests/tiny_models.py (vocabulary of at most VOCAB ids)."""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tiny_models import VOCAB

# family -> (special tokens in id order, keyword names, post-processing template or None)
_FAMILIES = {
    "bart": (["<s>", "<pad>", "</s>", "<unk>"], {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>",
                                                "unk_token": "<unk>"}, ("<s> $A </s>", "<s> $A </s> </s> $B </s>")),
    "t5": (["<pad>", "</s>", "<unk>"], {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
           ("$A </s>", "$A </s> $B </s>")),
    "gpt2": (["<|endoftext|>", "<unk>"], {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                                           "unk_token": "<unk>"}, None),  # no pad token, like GPT-2's
    "llama": (["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
              ("<s> $A", "<s> $A <s> $B")),
}


def words_of(*texts: str) -> list[str]:
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})


def word_tokenizer(family: str, *texts: str) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over the words of `texts`, with `family`'s specials."""
    specials, names, template = _FAMILIES[family]
    vocab = {token: i for i, token in enumerate(specials + words_of(*texts))}
    assert len(vocab) <= VOCAB, f"{len(vocab)} tokens do not fit the tiny models' vocabulary of {VOCAB}"
    backend = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if template is not None:
        single, pair = template
        used = sorted({t for t in (single + " " + pair).split() if t in vocab}, key=vocab.get)
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)
