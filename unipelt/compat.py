"""Every name unipelt reads from transformers beyond its public API, in one place.

transformers renames forward keywords, attributes and helper functions from one minor release to the next
(5.24 renamed the KV-cache keyword `past_key_values` to `cache`; 5.4 dropped `cache_position`; T5 has routed its
attention through AttentionInterface only since 5.15). Nothing else in unipelt spells these names: it asks this
module. Each name below says what it is and the transformers versions it was checked on (CI runs the suite on
the newest release the pyproject range allows and the attach / prefix / prompt / invariant tests on its minimum).

`check_model` runs at attach, before anything is modified: when a name this module expects has moved in the
installed transformers, it raises one line naming the model class, the name and the installed version, so a
renamed keyword can never turn into a silently wrong answer (a prompt inserted again at every decoding step).
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from typing import Any, Callable

import torch
import transformers
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.pytorch_utils import Conv1D

from .errors import AttachError

TRANSFORMERS_VERSION: str = transformers.__version__
# The range pyproject.toml declares and CI proves at both ends (.ci/run); every name below was checked on it. 5.25.0
# passes the whole suite too (hub kernels off), but pip resolves 5.24.0 where the index lacks its `kernels` >= 0.19.1.
CHECKED_RANGE = ("5.15.0", "5.25.0")

# ---- from_pretrained ------------------------------------------------------------------------------------------
# Keywords unipelt passes whenever it loads a model. `use_kernels`: False by default in 5.15-5.24; 5.25 turns hub
# kernels on by default, which swaps layer forwards for kernels downloaded from the hub (other numerics, code the
# hooks never see, network access, and the `kernels` package, which 5.25 requires and which the package index may
# not offer). unipelt attaches to the modules as the modeling file writes them, so it loads without hub kernels.
MODEL_LOAD_KWARGS: dict[str, Any] = {"use_kernels": False}

# ---- forward keywords of a model's forward ------------------------------------------------------------------
# The KV cache: `cache` since 5.24 (the old name still accepted, deprecated); `past_key_values` 5.15-5.23.
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values")
# Per-token positions a caller (generate()) may pass: `position_ids` on every checked version; `cache_position`
# only before 5.4, kept so a widened call stays consistent if a model still takes it.
POSITION_KWARGS: tuple[str, ...] = ("position_ids", "cache_position")
# The first input of an attention / MLP / layer module's forward when passed by keyword (5.15-5.24: BERT, BART,
# GPT-2, Llama, T5 layers take `hidden_states`; nn.Linear takes `input`).
MODULE_INPUT_KWARGS: tuple[str, ...] = ("hidden_states", "input")

# ---- keywords transformers passes to an attention function (AttentionInterface), 5.15-5.24 -------------------
ATTN_IS_CAUSAL = "is_causal"  # SDPA: causal masking without an explicit mask
ATTN_SCALING = "scaling"  # the softmax temperature the model uses (T5: 1.0)
ATTN_POSITION_BIAS = "position_bias"  # T5's relative position bias, added to the scores
ATTN_DROPOUT = "dropout"  # the attention-probability dropout rate of this call (0 in eval)

# ---- attributes ----------------------------------------------------------------------------------------------
_ATTN_IMPL_INTERNAL = "_attn_implementation_internal"  # PretrainedConfig's stored attention choice, 5.15-5.24
_KEEP_FP32 = "_keep_in_fp32_modules"  # PreTrainedModel: modules its own 4-bit loading keeps in float32
_NAME_OR_PATH = "_name_or_path"  # PretrainedConfig: where the weights came from


def cache_of(kwargs: dict) -> Any:
    """The KV cache a forward call carries, under whichever keyword the caller used (None when there is none)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_length(cache: Any) -> int:
    """Number of positions a KV cache already holds (a Cache object, or the legacy tuple of (key, value))."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def module_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first input of a submodule's forward, positional or by keyword."""
    if args:
        return args[0]
    for name in MODULE_INPUT_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def is_transposed_linear(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear map whose weight is stored [in, out] (nn.Linear stores [out, in])."""
    return isinstance(module, Conv1D)


def keep_in_fp32_modules(model: nn.Module) -> set[str]:
    return set(getattr(model, _KEEP_FP32, None) or [])


def name_or_path(config: Any) -> str:
    return getattr(config, _NAME_OR_PATH, "") or ""


def attention_implementation(config: Any) -> str:
    """The attention implementation a config selects ('eager' when unset)."""
    return getattr(config, "_attn_implementation", None) or "eager"


def route_attention(config: Any, implementation: str) -> Any:
    """A shallow copy of `config` whose attention calls go to `implementation` (a name registered below).
    Set on the stored attribute directly: the public setter recurses into sub-configs and validates the name."""
    shadow = copy.copy(config)
    setattr(shadow, _ATTN_IMPL_INTERNAL, implementation)
    return shadow


def register_attention(name: str, fn: Callable) -> None:
    AttentionInterface.register(name, fn)


def attention_function(name: str, eager: Callable) -> Callable:
    """The registered attention function `name` ('eager' → the modeling file's own `eager`)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)


def modeling_function(module: nn.Module, name: str) -> Callable | None:
    """A module-level function of the modeling file that defines `module`'s class (eager_attention_forward,
    shift_tokens_right), or None."""
    return getattr(sys.modules.get(type(module).__module__), name, None)


def eager_attention(attention: nn.Module) -> Callable:
    fn = modeling_function(attention, "eager_attention_forward")
    if fn is None:
        raise AttachError(f"prefix: {type(attention).__name__} has no eager_attention_forward in its modeling file "
                          f"(transformers {TRANSFORMERS_VERSION}); this attention class does not use "
                          f"transformers' AttentionInterface")
    return fn


def decoder_inputs_from(model: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """Decoder inputs a BART-style model derives from labels/input ids, or None where the family has no such
    helper."""
    shift = modeling_function(model, "shift_tokens_right")
    if shift is None:
        return None
    config = model.config
    options = {"pad_token_id": config.pad_token_id, "decoder_start_token_id": config.decoder_start_token_id}
    accepted = inspect.signature(shift).parameters
    return shift(ids, **{k: v for k, v in options.items() if k in accepted})


# Model types that have a given kind of head: the auto-class tables (transformers.models.auto.modeling_auto,
# `*_MAPPING_NAMES`, 5.15-5.24).
_HEAD_TABLES = {
    "seq2seq_lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


def model_types_with(head: str) -> frozenset[str]:
    """The config.model_type values that have an auto class for `head` (a key of _HEAD_TABLES)."""
    from transformers.models.auto import modeling_auto

    table = getattr(modeling_auto, _HEAD_TABLES[head], None)
    if table is None:
        raise RuntimeError(f"transformers {TRANSFORMERS_VERSION}: modeling_auto.{_HEAD_TABLES[head]} not found; "
                           f"unipelt was checked on transformers {CHECKED_RANGE[0]}-{CHECKED_RANGE[1]}")
    return frozenset(table)


def forward_parameters(module: nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


def _moved(model: nn.Module, name: str, expected: str) -> AttachError:
    return AttachError(f"{type(model).__name__}: {name} not found ({expected}) with transformers "
                       f"{TRANSFORMERS_VERSION} installed; unipelt was checked on transformers "
                       f"{CHECKED_RANGE[0]}-{CHECKED_RANGE[1]}")


def check_cache_keyword(model: nn.Module) -> None:
    """A decoder whose forward takes a KV cache must take it under a keyword of CACHE_KWARGS (prompts shift
    positions only on calls that continue a cache; a cache under another name would re-insert the prompt)."""
    params = forward_parameters(model)
    if "use_cache" in params and not params & set(CACHE_KWARGS):
        raise _moved(model, "the KV-cache keyword of forward()", "expected one of " + ", ".join(CACHE_KWARGS))


def check_input_keywords(model: nn.Module) -> None:
    params = forward_parameters(model)
    for name in ("input_ids", "inputs_embeds", "attention_mask"):
        if name not in params:
            raise _moved(model, f"forward() keyword '{name}'", "prompts insert virtual tokens through it")


def check_attention_routing(model: nn.Module, attention: nn.Module) -> None:
    """An attention module a prefix is placed on must read its implementation from its config and call the
    AttentionInterface (the modeling file defines eager_attention_forward)."""
    config = getattr(attention, "config", None)
    if config is None:
        raise _moved(attention, "attention.config", "the attention module keeps no config to route through")
    if not hasattr(config, _ATTN_IMPL_INTERNAL):
        raise _moved(attention, f"config.{_ATTN_IMPL_INTERNAL}", "the attention implementation is stored there")
    eager_attention(attention)


def check_model(model: nn.Module, *, prompts: bool, prefixed_attention: list[nn.Module]) -> None:
    """Run at attach, before anything changes: every private name the attached forms will read is where this
    module expects it on the installed transformers."""
    if prompts:
        base = getattr(model, "base_model", model)
        for module in dict.fromkeys((model, base)):
            check_input_keywords(module)
            check_cache_keyword(module)
    for attention in prefixed_attention:
        check_attention_routing(model, attention)


# ---- torch.compile (torch, not transformers: the same rule, one place) ---------------------------------------
# torch.compile(model) returns torch._dynamo.eval_frame.OptimizedModule, which holds the compiled model as its child
# `_orig_mod` (torch 2.4-2.13). Its attribute reads fall through to that model (`.config` works), but its own __dict__
# and its module and parameter names (each starting with `_orig_mod.`) are the wrapper's, so every lookup by the
# model's identity or by name must see the model inside. Trainer(torch_compile=True), accelerate's prepare() and
# unwrap_model(keep_torch_compile=True) hand back the same wrapper.
_COMPILED_MODULE = "torch._dynamo.eval_frame"
_COMPILED_CLASS = "OptimizedModule"
_COMPILED_INNER = "_orig_mod"


def _compiled_class() -> type | None:
    """OptimizedModule, or None while its module is not loaded (no model can be compiled before it is): looked up
    in sys.modules, never imported from here."""
    return getattr(sys.modules.get(_COMPILED_MODULE), _COMPILED_CLASS, None)


def is_compiled(model: Any) -> bool:
    """Whether `model` is a torch.compile wrapper (OptimizedModule)."""
    cls = _compiled_class()
    return cls is not None and isinstance(model, cls)


def unwrap_compiled(model: Any) -> Any:
    """The model a torch.compile wrapper compiles (through wrappers of wrappers); anything else as it is."""
    while is_compiled(model):
        inner = model.__dict__.get("_modules", {}).get(_COMPILED_INNER)
        if not isinstance(inner, nn.Module):
            raise AttachError(f"a torch.compile'd {type(model).__name__} without its '{_COMPILED_INNER}' module "
                              f"(torch {torch.__version__}); pass the model itself")
        model = inner
    return model


def accepts_compiled(fn: Callable) -> Callable:
    """`fn(model, ...)` that also takes a torch.compile'd model: it runs on the model inside (first positional
    argument, or `model=`), and where it returns that inner model it returns what the caller passed (the wrapper,
    still compiled), so `model = unipelt.attach(torch.compile(m), "lora")` keeps a compiled model."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args:
            given = args[0]
            inner = unwrap_compiled(given)
            result = fn(inner, *args[1:], **kwargs)
        elif "model" in kwargs:
            given = kwargs["model"]
            inner = unwrap_compiled(given)
            result = fn(**{**kwargs, "model": inner})
        else:
            return fn(*args, **kwargs)
        return given if result is inner and inner is not given else result

    return wrapper


__all__ = [
    "TRANSFORMERS_VERSION", "CHECKED_RANGE", "MODEL_LOAD_KWARGS", "CACHE_KWARGS", "POSITION_KWARGS", "MODULE_INPUT_KWARGS",
    "ATTN_IS_CAUSAL", "ATTN_SCALING", "ATTN_POSITION_BIAS", "ATTN_DROPOUT", "cache_of", "cache_length", "module_input",
    "is_transposed_linear", "keep_in_fp32_modules", "name_or_path", "attention_implementation", "route_attention",
    "register_attention", "attention_function", "modeling_function", "eager_attention", "decoder_inputs_from",
    "model_types_with", "check_model", "is_compiled", "unwrap_compiled", "accepts_compiled",
]
