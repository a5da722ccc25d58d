"""The Romanian side of the reference WMT16 en-ro BLEU (He et al.'s exps/romanian_postprocess.sh, after Sennrich et
al.'s WMT16 preprocessing): both the system output and the reference go through Moses punctuation normalisation
(with Unicode punctuation replaced and non-printing characters removed), the s-/t-comma normalisation, diacritics
removal and the Moses tokenizer (no escaping), and BLEU is computed on those tokens as they are (sacrebleu
`-tok none`). The Moses steps come from sacremoses; the two Romanian steps are the character maps below."""

from __future__ import annotations

from functools import lru_cache

# Cedilla forms (legacy encodings) -> the comma-below letters that Romanian orthography uses.
_COMMA_BELOW = str.maketrans({"\u015e": "\u0218", "\u015f": "\u0219", "\u0162": "\u021a", "\u0163": "\u021b"})
# Comma-below s/t, a-breve, a-circumflex and i-circumflex -> the bare Latin letters (cedillas are normalised first).
_BARE = str.maketrans({"\u0218": "S", "\u0219": "s", "\u021a": "T", "\u021b": "t", "\u0102": "A", "\u0103": "a",
                       "\u00c2": "A", "\u00e2": "a", "\u00ce": "I", "\u00ee": "i"})


def normalise_romanian(text: str) -> str:
    """s-cedilla / t-cedilla (U+015E/F, U+0162/3) written as s-comma / t-comma (U+0218/9, U+021A/B)."""
    return text.translate(_COMMA_BELOW)


def remove_diacritics(text: str) -> str:
    """Romanian letters with diacritics as bare letters; expects comma-below s/t (run normalise_romanian first)."""
    return text.translate(_BARE)


@lru_cache(maxsize=None)
def _moses(lang: str):
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    normalizer = MosesPunctNormalizer(lang=lang, pre_replace_unicode_punct=True, post_remove_control_chars=True)
    return normalizer, MosesTokenizer(lang=lang)


def reference_tokens(text: str) -> str:
    """One line as romanian_postprocess.sh leaves it: normalised, without diacritics, Moses-tokenized."""
    normalizer, tokenizer = _moses("ro")
    text = remove_diacritics(normalise_romanian(normalizer.normalize(text.replace("\n", " "))))
    return tokenizer.tokenize(text, escape=False, return_str=True)


__all__ = ["normalise_romanian", "remove_diacritics", "reference_tokens"]
