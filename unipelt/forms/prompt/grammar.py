"""The `prompt` form's options: virtual tokens at the input (prompt tuning, P-tuning).

Validated here, before any model is touched, with one-line errors naming the key. spec.py calls
`prompt_options` (through the form, __init__.py).

    length: 20            # l virtual tokens
    init: vocab           # random (uniform in [-0.5, 0.5], Lester et al.) | vocab (embeddings of tokens drawn
                          # uniformly from the vocabulary) | text (embeddings of init_text, repeated to fill l)
    init_text: "..."      # with init: text; a string (the base model's own tokenizer) or a list of token ids
    encoder: none         # none | mlp | lstm: P-tuning's prompt encoder (training aid; its output is what is saved)
    encoder_dim: 256      # the encoder's hidden width (default: the embedding width d)
    template:             # where the virtual tokens sit; default [{prompt: <length>}, input]
      - input_first       #   the input's first token ([CLS], <s>) ...
      - prompt: 10        #   10 virtual tokens
      - input_rest        #   ... and the rest of the input (or `input`: the whole input, once)
      - anchor: "?"       #   fixed tokens, embedded by the frozen vocabulary (text or token ids)
      - prompt: 10
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import MethodConfigError, allowed

PROMPT_INITS = ("random", "vocab", "text")
PROMPT_ENCODERS = ("none", "mlp", "lstm")
INPUT_ITEMS = ("input", "input_first", "input_rest")
TEMPLATE_KEYS = ("prompt", "anchor")
DEFAULT_LENGTH = 20

# One template item, stored hashable: ("input",), ("input_first",), ("input_rest",), ("prompt", n),
# ("anchor", "text") or ("anchor", (id, id, ...)).
TemplateItem = tuple


def prompt_options(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The prompt-specific ModuleSpec values of a raw module mapping."""
    length = raw.get("length", DEFAULT_LENGTH)
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise MethodConfigError(f"{where}: length: expected a positive integer, got {length!r}")
    init = raw.get("init", "vocab")
    if init not in PROMPT_INITS:
        raise MethodConfigError(f"{where}: init: unknown value {init!r} for form 'prompt' "
                                f"(allowed: {allowed(PROMPT_INITS)})")
    init_text = raw.get("init_text")
    if init == "text" and init_text is None:
        raise MethodConfigError(f"{where}: init 'text' needs init_text (a string or a list of token ids)")
    if init != "text" and init_text is not None:
        raise MethodConfigError(f"{where}: key 'init_text' needs init 'text' (got init '{init}')")
    if init_text is not None:
        init_text = token_source(init_text, f"{where}: init_text")
        if isinstance(init_text, tuple) and len(init_text) > length:
            raise MethodConfigError(f"{where}: init_text has {len(init_text)} tokens, more than length {length}")
    encoder = raw.get("encoder", "none")
    if encoder not in PROMPT_ENCODERS:
        raise MethodConfigError(f"{where}: encoder: unknown value {encoder!r} (allowed: {allowed(PROMPT_ENCODERS)})")
    encoder_dim = raw.get("encoder_dim")
    if encoder_dim is not None:
        if encoder == "none":
            raise MethodConfigError(f"{where}: key 'encoder_dim' needs encoder 'mlp' or 'lstm' (got encoder 'none')")
        if isinstance(encoder_dim, bool) or not isinstance(encoder_dim, int) or encoder_dim <= 0:
            raise MethodConfigError(f"{where}: encoder_dim: expected a positive integer, got {encoder_dim!r}")
    template = raw.get("template")
    if template is not None:
        template = parse_template(template, length, f"{where}: template")
    return {"length": length, "init": init, "init_text": init_text, "encoder": encoder,
            "encoder_dim": encoder_dim, "template": template}


def token_source(value: Any, where: str) -> str | tuple[int, ...]:
    """A non-empty text, or a non-empty list of non-negative token ids (stored as a tuple)."""
    if isinstance(value, str):
        if not value.strip():
            raise MethodConfigError(f"{where}: empty text")
        return value
    if isinstance(value, (list, tuple)) and value:
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise MethodConfigError(f"{where}: token ids must be non-negative integers, got {item!r}")
        return tuple(value)
    raise MethodConfigError(f"{where}: expected a non-empty string or a non-empty list of token ids, got {value!r}")


def parse_template(value: Any, length: int, where: str) -> tuple[TemplateItem, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise MethodConfigError(f"{where}: expected a non-empty list of items "
                                f"(allowed: {allowed(INPUT_ITEMS)}, prompt: n, anchor: text)")
    items: list[TemplateItem] = []
    for position, item in enumerate(value):
        at = f"{where} item {position}"
        if isinstance(item, str):
            if item not in INPUT_ITEMS:
                raise MethodConfigError(f"{at}: unknown item {item!r} (allowed: {allowed(INPUT_ITEMS)}, "
                                        "prompt: n, anchor: text)")
            items.append((item,))
            continue
        if not isinstance(item, Mapping) or len(item) != 1:
            raise MethodConfigError(f"{at}: expected one of {allowed(INPUT_ITEMS)} or a one-key mapping "
                                    f"(prompt: n, anchor: text), got {item!r}")
        key, content = next(iter(item.items()))
        if key not in TEMPLATE_KEYS:
            raise MethodConfigError(f"{at}: unknown key {key!r} (allowed: {allowed(TEMPLATE_KEYS)})")
        if key == "prompt":
            if isinstance(content, bool) or not isinstance(content, int) or content <= 0:
                raise MethodConfigError(f"{at}: prompt: expected a positive number of virtual tokens, got {content!r}")
            items.append(("prompt", content))
        else:
            items.append(("anchor", token_source(content, f"{at}: anchor")))
    kinds = [item[0] for item in items]
    whole, first, rest = (kinds.count(k) for k in INPUT_ITEMS)
    if not ((whole == 1 and first == rest == 0) or (whole == 0 and first == rest == 1)):
        raise MethodConfigError(f"{where}: the input must appear once: either 'input', or 'input_first' "
                                "followed by 'input_rest'")
    if first and kinds.index("input_first") > kinds.index("input_rest"):
        raise MethodConfigError(f"{where}: 'input_first' must come before 'input_rest'")
    virtual = sum(item[1] for item in items if item[0] == "prompt")
    if virtual != length:
        raise MethodConfigError(f"{where}: prompt items hold {virtual} virtual tokens but length is {length}")
    return tuple(items)


def default_template(length: int) -> tuple[TemplateItem, ...]:
    """Lester et al.: all virtual tokens before the input."""
    return (("prompt", length), ("input",))


def template_to_yaml(template: tuple[TemplateItem, ...]) -> list[Any]:
    """The YAML form of a template (what parse_template reads back)."""
    out: list[Any] = []
    for item in template:
        if len(item) == 1:
            out.append(item[0])
        else:
            content = item[1]
            out.append({item[0]: list(content) if isinstance(content, tuple) else content})
    return out


__all__ = ["PROMPT_INITS", "PROMPT_ENCODERS", "prompt_options", "parse_template",
           "default_template", "template_to_yaml"]
