"""Where each site lives in each model family: a small declarative table, one entry per family.

Paths are relative to one transformer layer of a stack. A projection site is one linear map (optionally one
chunk of a fused map); a sub-layer site reads x at the input of `x` and modifies h at the output of `h`; a head
site modifies the concatenated head outputs at the input of the output projection `o`.

To add a family: map its `config.model_type` to a Family below (look at `print(model)` for the paths). That is
all: an adapter's identity is the model config itself (identity.py), and the shared tests pick the family up
once tests/tiny_models.py can build a tiny one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import AttachError, allowed


@dataclass(frozen=True)
class Projection:
    path: str
    chunk: tuple[int, int] | None = None  # (index, count) within a fused projection


@dataclass(frozen=True)
class SubLayer:
    x: str  # module whose input is the sub-layer input x
    h: str  # module whose output is the sub-layer output h (before residual / norm)


@dataclass(frozen=True)
class Activation:
    h: str  # the projection whose input is h (the FFN's down projection: its input is the hidden activation)
    x: str  # module whose input is the sub-layer input x
    up: str  # a projection reading x (its input width is the width of x)


@dataclass(frozen=True)
class Heads:
    attention: str  # the attention module: prefix acts inside it, x is its input
    o: str  # output projection: its input is the concatenation of the head outputs


@dataclass(frozen=True)
class Norm:
    """The FFN output as AdapterHub's Pfeiffer adapter reads it. Post-LN layers: `ln` is the output LayerNorm (its
    input is h + residual). Pre-LN layers (`pre_ln`): `ln` is the module whose output is h + residual itself (the
    layer, or T5's FFN block), and `down` the FFN's output projection (for the width)."""

    ln: str
    pre_ln: bool = False
    down: str = ""


@dataclass(frozen=True)
class Stack:
    path: str  # the ModuleList of layers, relative to model.base_model
    sites: dict[str, Projection | SubLayer | Heads | Activation | Norm] = field(default_factory=dict)


@dataclass(frozen=True)
class Inputs:
    """The `embeddings` site (prompts): the token embedding module, and for encoder-decoders the encoder stack,
    whose calls from generate() bypass the base model. Paths are relative to model.base_model."""

    tokens: str
    encoder: str | None = None


@dataclass(frozen=True)
class Family:
    stacks: dict[str, Stack]
    head_dim_attr: str  # attribute of the attention module holding the per-head dimension
    inputs: Inputs | None = None


def attention_sites(kind: str, module: str, q: str, k: str, v: str, o: str) -> dict:
    """The six sites of one attention block (`attn` for self-attention, `cross_attn` for cross-attention).

    q, k, v are relative to the attention module; o is relative to the layer (BERT keeps it outside)."""
    return {
        f"{kind}.q": Projection(f"{module}.{q}"),
        f"{kind}.k": Projection(f"{module}.{k}"),
        f"{kind}.v": Projection(f"{module}.{v}"),
        f"{kind}.o": Projection(o),
        kind: SubLayer(x=module, h=o),
        f"{kind}.heads": Heads(attention=module, o=o),
    }


def ffn_sites(x: str, up: str, down: str, gate: str | None = None) -> dict:
    sites = {"ffn.up": Projection(up), "ffn.down": Projection(down), "ffn": SubLayer(x=x, h=down),
             "ffn.act": Activation(h=down, x=x, up=up)}
    if gate is not None:
        sites["ffn.gate"] = Projection(gate)
    return sites


_BERT = Family(
    stacks={
        "encoder": Stack(
            "encoder.layer",
            {
                **attention_sites("attn", "attention.self", "query", "key", "value", "attention.output.dense"),
                **ffn_sites("intermediate", "intermediate.dense", "output.dense"),
                "ffn.ln": Norm("output.LayerNorm"),
            },
        )
    },
    head_dim_attr="attention_head_size",
    inputs=Inputs("embeddings.word_embeddings"),
)

_GPT2 = Family(
    stacks={
        "decoder": Stack(
            "h",
            {
                **attention_sites("attn", "attn", "c_attn", "c_attn", "c_attn", "attn.c_proj"),
                "attn.q": Projection("attn.c_attn", (0, 3)),
                "attn.k": Projection("attn.c_attn", (1, 3)),
                "attn.v": Projection("attn.c_attn", (2, 3)),
                **ffn_sites("mlp", "mlp.c_fc", "mlp.c_proj"),
                "ffn.ln": Norm("", pre_ln=True, down="mlp.c_proj"),
            },
        )
    },
    head_dim_attr="head_dim",
    inputs=Inputs("wte"),
)

_LLAMA = Family(
    stacks={
        "decoder": Stack(
            "layers",
            {
                **attention_sites("attn", "self_attn", "q_proj", "k_proj", "v_proj", "self_attn.o_proj"),
                **ffn_sites("mlp", "mlp.up_proj", "mlp.down_proj", gate="mlp.gate_proj"),
                "ffn.ln": Norm("", pre_ln=True, down="mlp.down_proj"),
            },
        )
    },
    head_dim_attr="head_dim",
    inputs=Inputs("embed_tokens"),
)

_BART_FFN = {**ffn_sites("fc1", "fc1", "fc2"), "ffn.ln": Norm("final_layer_norm")}
_BART = Family(
    stacks={
        "encoder": Stack(
            "encoder.layers",
            {**attention_sites("attn", "self_attn", "q_proj", "k_proj", "v_proj", "self_attn.out_proj"), **_BART_FFN},
        ),
        "decoder": Stack(
            "decoder.layers",
            {
                **attention_sites("attn", "self_attn", "q_proj", "k_proj", "v_proj", "self_attn.out_proj"),
                **attention_sites("cross_attn", "encoder_attn", "q_proj", "k_proj", "v_proj", "encoder_attn.out_proj"),
                **_BART_FFN,
            },
        ),
    },
    head_dim_attr="head_dim",
    inputs=Inputs("encoder.embed_tokens", encoder="encoder"),
)


def _t5_ffn(index: int) -> dict:
    # T5 v1.0 has wi; gated variants (v1.1, Flan) have wi_0 (gate) and wi_1 (up). Both are listed; the
    # resolver keeps the paths that exist in the model.
    ffn = f"layer.{index}.DenseReluDense"
    return {
        "ffn.up": Projection(f"{ffn}.wi|{ffn}.wi_1"),
        "ffn.gate": Projection(f"{ffn}.wi_0"),
        "ffn.down": Projection(f"{ffn}.wo"),
        "ffn": SubLayer(x=ffn, h=f"{ffn}.wo"),
        "ffn.act": Activation(h=f"{ffn}.wo", x=ffn, up=f"{ffn}.wi|{ffn}.wi_1"),
        "ffn.ln": Norm(f"layer.{index}", pre_ln=True, down=f"{ffn}.wo"),
    }


_T5 = Family(
    stacks={
        "encoder": Stack(
            "encoder.block",
            {**attention_sites("attn", "layer.0.SelfAttention", "q", "k", "v", "layer.0.SelfAttention.o"), **_t5_ffn(1)},
        ),
        "decoder": Stack(
            "decoder.block",
            {
                **attention_sites("attn", "layer.0.SelfAttention", "q", "k", "v", "layer.0.SelfAttention.o"),
                **attention_sites("cross_attn", "layer.1.EncDecAttention", "q", "k", "v", "layer.1.EncDecAttention.o"),
                **_t5_ffn(2),
            },
        ),
    },
    head_dim_attr="key_value_proj_dim",
    inputs=Inputs("encoder.embed_tokens", encoder="encoder"),
)

FAMILIES: dict[str, Family] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "bart": _BART,
    "mbart": _BART,
    "t5": _T5,
    "mt5": _T5,
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise AttachError(
            f"model type '{model_type}' is not supported (supported: {allowed(sorted(FAMILIES))}); "
            "add its module paths as a Family in unipelt/sites/table.py"
        )
    return FAMILIES[model_type]
