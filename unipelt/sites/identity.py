"""What identifies a base model for an adapter file: its whole config, minus the few keys that only say how it was
trained or loaded. No per-family key list: a new family's fields (widths, activations, norms...) are covered as
soon as it has a config.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .. import compat

# Keys that do not change the computation of a loaded base: names, labels, loading and output switches, dropout,
# initialisation, dtype, the attention kernel. Keys starting with "_" are transformers' own bookkeeping.
TRAINING_TIME_KEYS = frozenset({
    "name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "id2label", "label2id",
    "num_labels", "problem_type", "finetuning_task", "task_specific_params", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "tokenizer_class", "initializer_range",
    "initializer_factor", "init_std", "gradient_checkpointing", "use_return_dict", "chunk_size_feed_forward",
    "pruned_heads", "attn_implementation",
})


def _training_time(key: str) -> bool:
    return key in TRAINING_TIME_KEYS or "dropout" in key or key.endswith("_pdrop") or key.startswith("_")


def architecture(config: Any) -> dict[str, Any]:
    """The config as a JSON-safe dict, training-time keys left out (nested configs alike)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items()) if not _training_time(str(k))}
        return value

    return json.loads(json.dumps(clean(raw), default=str))


def config_hash(config: Any) -> str:
    """A stable hash (16 hex digits) of the base config's architecture (see architecture())."""
    text = json.dumps(architecture(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_identity(config: Any) -> dict[str, Any]:
    """What an adapter file records about its base: the model type, the name, the architecture and its hash
    (last, so that a mismatch in a named field is reported by name first)."""
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": compat.name_or_path(config),
        "architecture": architecture(config),
        "config_hash": config_hash(config),
    }


__all__ = ["TRAINING_TIME_KEYS", "architecture", "base_identity", "config_hash"]
