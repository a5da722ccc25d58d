"""unipelt.compat owns every transformers-private name: nothing else spells one, a moved name is one line at attach
naming the model class, the name and the installed version, and decoding with a KV cache under either keyword
gives the logits of a full recomputation."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from needs import need_module
from numerics import assert_close_scaled
from tiny_models import tiny_batch, tiny_model

import unipelt
from unipelt import compat
from unipelt.errors import AttachError

PACKAGE = Path(unipelt.__file__).resolve().parent

# Names transformers may rename between minor releases. Only unipelt/compat.py may spell them in code (strings,
# attributes, imported names); docstrings and comments may mention them.
PRIVATE_NAMES = {
    "past_key_values", "cache_position", "_attn_implementation", "_attn_implementation_internal",
    "eager_attention_forward", "Conv1D", "_keep_in_fp32_modules", "_name_or_path", "shift_tokens_right",
    "modeling_auto", "hidden_states", "position_bias", "get_seq_length", "ALL_ATTENTION_FUNCTIONS",
    "AttentionInterface", "get_interface", "pytorch_utils", "modeling_utils",
}


def _code_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.update(part for part in node.value.replace(".", " ").split() if part in PRIVATE_NAMES)
            if node.value in PRIVATE_NAMES:
                found.add(node.value)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            found.update(part for alias in node.names for part in alias.name.split("."))
            if isinstance(node, ast.ImportFrom) and node.module:
                found.update(node.module.split("."))
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(node.arg)
    return found & PRIVATE_NAMES


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "compat.py")


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_only_compat_spells_transformers_private_names(path: Path) -> None:
    assert not _code_names(path), f"{path.relative_to(PACKAGE)} reads {sorted(_code_names(path))}; go through compat"


def test_the_scan_sees_a_private_name() -> None:
    """The scan above can fail: compat itself spells them."""
    assert {"past_key_values", "_attn_implementation_internal", "Conv1D"} <= _code_names(PACKAGE / "compat.py")


def test_checked_range_is_the_declared_range() -> None:
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    low, high = compat.CHECKED_RANGE
    assert f'"transformers>={low},<{int(high.split(".")[0]) + 1}"' in pyproject
    installed = tuple(int(x) for x in compat.TRANSFORMERS_VERSION.split(".")[:2])
    assert tuple(int(x) for x in low.split(".")[:2]) <= installed


def _cache_keyword(model) -> str:
    params = set(inspect.signature(model.forward).parameters)
    (name,) = [n for n in compat.CACHE_KWARGS if n in params]
    return name


def _renamed_cache_model():
    """A GPT-2 whose forward takes its KV cache under a keyword unipelt does not know (as a future release may)."""
    from transformers import GPT2LMHeadModel

    class RenamedCacheGPT2(GPT2LMHeadModel):
        def forward(self, input_ids=None, kv_store=None, attention_mask=None, inputs_embeds=None, use_cache=None,
                    **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, **kwargs)

    base = tiny_model("gpt2")
    model = RenamedCacheGPT2(base.config)
    model.load_state_dict(base.state_dict())
    return model.eval()


def test_a_moved_cache_keyword_is_one_line_at_attach() -> None:
    model = _renamed_cache_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AttachError) as err:
        unipelt.attach(model, "prompt_tuning")
    message = str(err.value)
    assert "\n" not in message
    assert "RenamedCacheGPT2" in message and "KV-cache keyword" in message
    assert compat.TRANSFORMERS_VERSION in message
    assert not unipelt.is_attached(model)  # nothing modified
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_attention_outside_the_attention_interface_is_one_line_at_attach() -> None:
    model = tiny_model("bert")
    attention = model.bert.encoder.layer[0].attention.self
    # A class defined in this test module: its modeling file (this file) has no eager_attention_forward.
    attention.__class__ = type("HandWrittenSelfAttention", (type(attention),), {})
    with pytest.raises(AttachError) as err:
        unipelt.attach(model, "prefix")
    message = str(err.value)
    assert "\n" not in message and "HandWrittenSelfAttention" in message
    assert "eager_attention_forward" in message and compat.TRANSFORMERS_VERSION in message
    assert not unipelt.is_attached(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_step_equals_recomputation_under_each_cache_keyword(family: str) -> None:
    """The prompt is inserted once: a decoding step that continues a cache gives the logits of recomputing the whole
    sequence. The keyword the installed forward declares, and the older one where it is still accepted."""
    model = tiny_model(family)
    unipelt.attach(model, {"name": "pt", "modules": [{"form": "prompt", "at": "embeddings", "insertion": "parallel",
                                                     "compose": "gate", "length": 4, "init": "random"}]})
    batch = tiny_batch(family, batch=1, length=6, padded=False)
    ids = batch["input_ids"]
    next_id = torch.tensor([[5]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, next_id], 1)).logits[:, -1]
        keywords = [_cache_keyword(model)]
        if keywords[0] != "past_key_values" and "past_key_values" in compat.CACHE_KWARGS:
            keywords.append("past_key_values")  # deprecated alias, still accepted
        for keyword in keywords:
            first = model(input_ids=ids, use_cache=True)
            cache = compat.cache_of(first)
            assert compat.cache_length(cache) == ids.shape[1] + 4
            step = model(input_ids=next_id, use_cache=True, **{keyword: cache}).logits[:, -1]
            assert_close_scaled(step, full, ops=9 * model.config.num_hidden_layers + 1,
                                reason="every matmul over 1 row (and the cached keys) instead of the whole "
                                       "sequence: at most 9 a layer (q, k, v, o, QKᵀ, AV, FFN ×3) and the LM head")


def test_module_input_reads_positional_or_keyword() -> None:
    x = torch.ones(2)
    assert compat.module_input((x,), {}) is x
    assert compat.module_input((), {"hidden_states": x}) is x
    assert compat.module_input((), {"input": x}) is x
    assert compat.module_input((), {}) is None


def test_conv1d_is_the_transposed_linear() -> None:
    model = tiny_model("gpt2")
    assert compat.is_transposed_linear(model.transformer.h[0].attn.c_attn)
    assert not compat.is_transposed_linear(torch.nn.Linear(2, 2))


def test_peft_is_importable_on_the_installed_transformers() -> None:
    need_module("peft")


def test_models_load_without_hub_kernels(tmp_path, monkeypatch):
    """transformers 5.25 turns hub kernels on by default in from_pretrained (layer forwards swapped for downloaded
    kernels, which the hooks never see); the app loads every model with compat.MODEL_LOAD_KWARGS, which turn them
    off on every version of the range."""
    from hydra import compose, initialize_config_module
    from transformers import AutoModelForSequenceClassification

    import unipelt.app.main as app
    from app_fixtures import make_small_sst2, make_tiny_model

    asked: dict = {}
    original = AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        lambda *args, **kwargs: (asked.update(kwargs), original(*args, **kwargs))[1])
    model_dir, data_dir = make_tiny_model(tmp_path / "model"), make_small_sst2(tmp_path / "data")
    with initialize_config_module(config_module="unipelt.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"model.name_or_path={model_dir}", f"task.data_dir={data_dir}",
                                          "trainer.max_length=32"])
    _, task_cfg, train_cfg = app.validate(cfg)
    app._load_model(cfg, task_cfg, train_cfg, seed=0)
    assert compat.MODEL_LOAD_KWARGS == {"use_kernels": False} and asked["use_kernels"] is False
