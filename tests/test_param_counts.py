"""Parameter accounting checked against formulas written out by hand (He et al. 2022, Appendix B).

Every count is built on the meta device from a config object, so nothing is downloaded or allocated. The
formulas below do not read the preset files: the presets' sizes (r = 64, l = 30, ...) are written here on
purpose, so a changed default shows up as a failing count.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BartConfig, BertConfig, RobertaConfig

import unipelt
from unipelt.cli import count as count_cli


@dataclass(frozen=True)
class Shape:
    """What the formulas need from a model: width, heads, FFN width and the layers in each stack."""

    d: int
    heads: int
    ffn: int
    encoder_layers: int
    decoder_layers: int = 0

    @property
    def self_attn(self) -> int:
        """Self-attention modules: `attn.*` sites act in the encoder and the decoder stack alike."""
        return self.encoder_layers + self.decoder_layers

    @property
    def ffns(self) -> int:
        return self.encoder_layers + self.decoder_layers

    @property
    def cross_attn(self) -> int:
        """Cross-attention modules (decoder only); touched only when a `cross_attn.*` site is listed."""
        return self.decoder_layers


def _configs():
    return {
        "bert-base": BertConfig(),  # the defaults are bert-base
        "roberta-base": RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                      pad_token_id=1),
        "bart-large": BartConfig(),  # the defaults are bart-large
    }


CONFIGS = _configs()
SHAPES = {
    "bert-base": Shape(d=768, heads=12, ffn=3072, encoder_layers=12),
    "roberta-base": Shape(d=768, heads=12, ffn=3072, encoder_layers=12),
    "bart-large": Shape(d=1024, heads=16, ffn=4096, encoder_layers=12, decoder_layers=12),
}
# The published sizes of the bare models (no task head; BERT and RoBERTa include the pooler).
PUBLISHED_BASE = {"bert-base": 109_482_240, "roberta-base": 124_645_632, "bart-large": 406_291_456}


# ---- the formulas -------------------------------------------------------------------------------------------

def bottleneck(d: int, r: int, bias: bool) -> int:
    """Adapter d → r → d: 2·r·d weights, plus r (down) + d (up) biases when the adapter has biases."""
    return 2 * r * d + ((r + d) if bias else 0)


def lora(r: int, d_in: int, d_out: int) -> int:
    """LoRA on one d_in × d_out matrix: A is r × d_in, B is d_out × r, no bias."""
    return r * (d_in + d_out)


def prefix(length: int, d: int) -> int:
    """Prefix on one attention module: l keys and l values of width d (all heads together)."""
    return 2 * length * d


def prefix_mlp(length: int, d: int, mlp_dim: int, n_sites: int) -> int:
    """Li & Liang's reparameterisation, one MLP shared by the n_sites layers of one kind of attention:
    embedding l·d, W1 d·m + b1 m, W2 m·(n_sites·2·d) + b2 n_sites·2·d."""
    out = n_sites * 2 * d
    return length * d + d * mlp_dim + mlp_dim + mlp_dim * out + out


def prefix_mlps(length: int, d: int, mlp_dim: int, s: "Shape", cross: bool = True) -> int:
    """One MLP per kind of attention, as Li & Liang's and He et al.'s BART code (wte_enc / wte / wte2): encoder
    self-attention, decoder self-attention, decoder cross-attention."""
    kinds = [s.encoder_layers, s.decoder_layers, s.decoder_layers if cross else 0]
    return sum(prefix_mlp(length, d, mlp_dim, n) for n in kinds if n)


def prompt(length: int, d: int) -> int:
    """Prompt tuning: l virtual token embeddings of width d, once, at the input."""
    return length * d


def lstm_prompt_encoder(d: int, h: int) -> int:
    """P-tuning's encoder (THUDM/P-tuning): a 2-layer bidirectional LSTM, h/2 per direction (each gate block
    4·h/2, two bias vectors), on inputs of width d, then MLP h → h → d with biases."""
    k = h // 2
    layer1 = 4 * k * d + 4 * k * k + 8 * k
    layer2 = 4 * k * (2 * k) + 4 * k * k + 8 * k
    return 2 * (layer1 + layer2) + (h * h + h) + (h * d + d)


def layernorms(s: Shape, model: str) -> int:
    """LayerNorm weights and biases (2d each): BERT / RoBERTa two per layer plus the embedding LayerNorm; BART two
    per encoder layer, three per decoder layer plus the two layernorm_embedding."""
    if model == "bart-large":
        return 2 * s.d * (2 * s.encoder_layers + 3 * s.decoder_layers + 2)
    return 2 * s.d * (2 * s.encoder_layers + 1)


def bert_biases(s: Shape) -> int:
    """BERT / RoBERTa biases: per layer q, k, v, o (4d), attention LayerNorm (d), intermediate (ffn),
    output (d), output LayerNorm (d); plus the embedding LayerNorm and the pooler (d each)."""
    return s.encoder_layers * (7 * s.d + s.ffn) + 2 * s.d


def bart_biases(s: Shape) -> int:
    """BART biases: encoder layer = self-attention q, k, v, o + its LayerNorm + fc1 + fc2 + final LayerNorm
    (7d + ffn); decoder layer adds cross-attention q, k, v, o + its LayerNorm (12d + ffn); plus the two
    layernorm_embedding (d each)."""
    return s.encoder_layers * (7 * s.d + s.ffn) + s.decoder_layers * (12 * s.d + s.ffn) + 2 * s.d


def expected_counts(preset: str, model: str) -> dict[str, int]:
    """added / reparam / trained_base (and the part of `added` that is prefix vectors) for one preset."""
    s = SHAPES[model]
    biases = bart_biases(s) if model == "bart-large" else bert_biases(s)
    zero = {"added": 0, "reparam": 0, "trained_base": 0, "prefix_vectors": 0}
    if preset == "full":
        return {**zero, "trained_base": PUBLISHED_BASE[model]}
    if preset == "bitfit":
        return {**zero, "trained_base": biases}
    if preset == "houlsby":  # near_identity init keeps the adapter biases; the base LayerNorms train too
        return {**zero, "added": (s.self_attn + s.ffns) * bottleneck(s.d, 64, bias=True),
                "trained_base": layernorms(s, model)}
    if preset in ("pfeiffer", "pa"):  # near_identity / bert init: biases on
        return {**zero, "added": s.ffns * bottleneck(s.d, 64, bias=True)}
    if preset == "scaled_pa":  # LoRA init, but `bias: true` as in He et al.'s code
        return {**zero, "added": s.ffns * bottleneck(s.d, 512, bias=True)}
    if preset == "lora":  # W_q and W_v of every self-attention module, r = 8
        return {**zero, "added": 2 * s.self_attn * lora(8, s.d, s.d)}
    if preset == "mh_pa":  # He et al.'s ReLU prefix: l = 200 at every attention, MLP 800, plus its LayerNorm (2d)
        modules = s.self_attn + s.cross_attn
        vectors = modules * prefix(200, s.d)
        return {**zero, "added": vectors + modules * 2 * s.d, "prefix_vectors": vectors,
                "reparam": prefix_mlps(200, s.d, 800, s)}
    if preset == "prefix":  # l = 30, MLP width 800, at every attention (self and, on BART, cross)
        vectors = (s.self_attn + s.cross_attn) * prefix(30, s.d)
        return {**zero, "added": vectors, "prefix_vectors": vectors,
                "reparam": prefix_mlps(30, s.d, 800, s)}
    if preset == "mam":  # prefix l = 30 at every attention + scaled parallel adapter r = 512 (with biases) on the FFN
        vectors = (s.self_attn + s.cross_attn) * prefix(30, s.d)
        return {**zero, "added": vectors + s.ffns * bottleneck(s.d, 512, bias=True), "prefix_vectors": vectors,
                "reparam": prefix_mlps(30, s.d, 800, s)}
    if preset == "glue/mam":  # He et al.'s GLUE size: prefix l = 16 on self-attention (MLP 800), scaled PA r = 16
        vectors = s.self_attn * prefix(16, s.d)
        return {**zero, "added": vectors + s.ffns * bottleneck(s.d, 16, bias=True), "prefix_vectors": vectors,
                "reparam": prefix_mlps(16, s.d, 800, s, cross=False)}
    if preset == "prompt_tuning":  # l = 20 virtual tokens of width d at the input (Lester et al.)
        return {**zero, "added": prompt(20, s.d)}
    if preset == "p_tuning":  # the served l = 20 vectors; the LSTM encoder that produces them is reparam
        return {**zero, "added": prompt(20, s.d), "prefix_vectors": prompt(20, s.d),
                "reparam": prompt(20, s.d) + lstm_prompt_encoder(s.d, s.d)}
    if preset == "p_tuning_v2":  # prefix l = 20 on every self-attention module, no reparameterisation
        return {**zero, "added": s.self_attn * prefix(20, s.d)}
    if preset == "adalora":  # svd P·Λ·Q, init_r = 12, on q, k, v, o, up, down of every layer: r·(d_in + d_out + 1)
        per_layer = 4 * 12 * (2 * s.d + 1) + 2 * 12 * (s.d + s.ffn + 1)
        return {**zero, "added": s.self_attn * per_layer}
    if preset == "qlora":  # LoRA r = 64 on every linear projection (self- and cross-attention, FFN up and down)
        attention = (s.self_attn + s.cross_attn) * 4 * lora(64, s.d, s.d)
        return {**zero, "added": attention + s.ffns * (lora(64, s.d, s.ffn) + lora(64, s.ffn, s.d))}
    if preset == "unipelt":  # gated prefix l = 10 (MLP 512), gated adapter r = d/16 on the FFN, gated LoRA r = 8 on q, v
        gate = s.d + 1  # W_g: d → 1 with a bias, one per gated module
        vectors = s.self_attn * prefix(10, s.d)
        added = vectors + s.self_attn * gate + s.ffns * (bottleneck(s.d, s.d // 16, bias=True) + gate) \
            + 2 * s.self_attn * (lora(8, s.d, s.d) + gate)
        return {**zero, "added": added, "prefix_vectors": vectors,
                "reparam": prefix_mlps(10, s.d, 512, s, cross=False)}
    if preset == "ia3":  # (IA)³: a vector l over the keys and the values (d each) of every self-attention module and
        # over the FFN's hidden activation (d_ff) of every layer
        return {**zero, "added": s.self_attn * 2 * s.d + s.ffns * s.ffn}
    raise KeyError(preset)


# The presets re-derived by hand above. A preset without a hand formula is still counted on every family: the
# shared tester (test_invariants.py) holds its forms' declared formulas (Form.count) equal to what attach builds.
KNOWN_PRESETS = ("bitfit", "full", "houlsby", "lora", "mam", "glue/mam", "mh_pa", "pa", "pfeiffer", "prefix",
                 "scaled_pa", "prompt_tuning", "p_tuning", "p_tuning_v2", "adalora", "qlora", "unipelt", "ia3")
REDERIVED = [p for p in unipelt.list_presets() if p in KNOWN_PRESETS]


def meta_parameter_count(config) -> int:
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ---- the tests ----------------------------------------------------------------------------------------------

def test_the_hand_formulas_cover_the_seed_presets():
    # The presets the paper accounting was written for keep their independent re-derivation (a renamed or
    # removed preset shows up here); presets added since are checked through their forms' formulas.
    assert set(KNOWN_PRESETS) <= set(unipelt.list_presets())


@pytest.mark.parametrize("model", sorted(CONFIGS))
@pytest.mark.parametrize("preset", unipelt.list_presets())
def test_every_preset_counts_from_its_config(preset, model):
    """Every preset (re-derived here or not) counts on a config alone, and its counts add up."""
    counts = unipelt.count_parameters(CONFIGS[model], preset)
    assert counts["base"] == PUBLISHED_BASE[model]
    assert counts["total"] == counts["base"] + counts["added"]
    assert counts["percent"] == pytest.approx(100.0 * (counts["added"] + counts["trained_base"]) / counts["base"])
    assert counts["added"] > 0 or counts["trained_base"] > 0


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_base_is_the_meta_model_size(model):
    counts = unipelt.count_parameters(CONFIGS[model], "lora")
    assert counts["base"] == meta_parameter_count(CONFIGS[model]) == PUBLISHED_BASE[model]


@pytest.mark.parametrize("model", sorted(CONFIGS))
@pytest.mark.parametrize("preset", REDERIVED)
def test_preset_counts(preset, model):
    counts = unipelt.count_parameters(CONFIGS[model], preset)
    want = expected_counts(preset, model)
    base = PUBLISHED_BASE[model]

    assert counts["method"] == unipelt.load_method(preset).name
    assert counts["base"] == base
    assert counts["added"] == want["added"]
    assert counts["reparam"] == want["reparam"]
    assert counts["trained_base"] == want["trained_base"]
    assert counts["head"] == 0  # a bare AutoModel has no task head
    assert counts["total"] == base + want["added"]
    # For module presets trained_base is 0, so this is 100·added/base; full gives 100, BitFit biases/base.
    assert counts["percent"] == pytest.approx(100.0 * (want["added"] + want["trained_base"]) / base)
    # The optimizer trains the MLP, not the prefix vectors it produces (those exist only once folded).
    assert counts["trainable"] == want["added"] - want["prefix_vectors"] + want["reparam"] + want["trained_base"]


# He et al. Table 6 (BART-large; the percent of the base model each row prints), from the configs alone.
TABLE6 = [
    ("prefix", {0: {"length": 200}}, 3.6),
    ("mam", {}, 6.7),
    ("pfeiffer", {0: {"dim": 600}}, 7.2),
    ("mh_pa", {}, 3.6),
    ({"name": "lora_ffn", "modules": [dict(form="bottleneck", at=["ffn.up", "ffn.down"], insertion="parallel",
                                           compose="scale", scale=4.0, dim=102, activation="none", init="lora")]},
     {}, 6.2),  # 10·r·d per layer; the 7.2% beside it in He et al.'s plotting script is LoRA on attention r = 200
]


@pytest.mark.parametrize("method, changes, percent", TABLE6, ids=["prefix", "mam", "pfeiffer", "mh_pa", "lora_ffn"])
def test_table6_percentages_on_bart_large(method, changes, percent):
    spec = unipelt.load_method(method)
    for index, values in changes.items():
        spec = spec.replace_module(index, **values)
    counts = unipelt.count_parameters(CONFIGS["bart-large"], spec)
    # The table prints one decimal (truncated or rounded: 6.75% prints as 6.7, 6.17% as 6.2): within 0.1 of it
    assert abs(counts["percent"] - percent) < 0.1


def test_full_is_one_hundred_percent():
    assert unipelt.count_parameters(CONFIGS["bert-base"], "full")["percent"] == pytest.approx(100.0)


def _method(**options) -> dict:
    return {"name": "custom", "modules": [options]}


PREFIX_6 = dict(form="prefix", insertion="parallel", compose="gate", length=6)
LORA_4 = dict(form="bottleneck", insertion="parallel", compose="scale", scale=2.0, dim=4, activation="none",
              init="lora")


@pytest.mark.parametrize(
    "module, modules_touched",
    [
        # `attn.*` is self-attention in both stacks; cross-attention only when listed.
        (dict(PREFIX_6, at="attn.heads"), 12 + 12),
        (dict(PREFIX_6, at="cross_attn.heads"), 12),
        (dict(PREFIX_6, at=["attn.heads", "cross_attn.heads"]), 12 + 12 + 12),
        (dict(PREFIX_6, at="attn.heads", stacks="encoder"), 12),
        (dict(PREFIX_6, at="attn.heads", layers=[0, 11]), 2 + 2),
    ],
    ids=["self", "cross", "self+cross", "encoder-only", "two-layers"],
)
def test_bart_prefix_sites(module, modules_touched):
    counts = unipelt.count_parameters(CONFIGS["bart-large"], _method(**module))
    assert counts["added"] == modules_touched * prefix(6, 1024)
    assert counts["reparam"] == 0  # no mlp_dim: the vectors themselves train
    assert counts["trainable"] == counts["added"]


@pytest.mark.parametrize(
    "at, matrices",
    [("attn.q", 12 + 12), ("cross_attn.q", 12), (["attn.q", "cross_attn.v"], 12 + 12 + 12)],
    ids=["self", "cross", "self+cross"],
)
def test_bart_lora_sites(at, matrices):
    counts = unipelt.count_parameters(CONFIGS["bart-large"], _method(**LORA_4, at=at))
    assert counts["added"] == matrices * lora(4, 1024, 1024)


def test_learned_scale_and_sigmoid_gate_are_counted():
    # A learned scale is one scalar per placed module; a sigmoid gate is a d → 1 linear map with bias.
    learned_lora = dict(LORA_4, scale="learned", at="attn.q")
    learned = unipelt.count_parameters(CONFIGS["bert-base"], _method(**learned_lora))
    assert learned["added"] == 12 * (lora(4, 768, 768) + 1)
    gated = dict(form="bottleneck", at="ffn", insertion="parallel", compose="sigmoid_gate", dim=8)
    counts = unipelt.count_parameters(CONFIGS["bert-base"], _method(**gated))
    assert counts["added"] == 12 * (bottleneck(768, 8, bias=True) + 768 + 1)


# ---- unipelt-count ------------------------------------------------------------------------------------------

def _table(text: str) -> dict[str, str]:
    rows = {}
    for line in text.strip().splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


@pytest.mark.parametrize("preset, model, conf_name", [("lora", "bert-base", "bert_base"),
                                                      ("mam", "bart-large", "bart_large"),
                                                      ("bitfit", "roberta-base", "roberta_base")])
def test_cli_table(preset, model, conf_name, capsys):
    assert count_cli.main([f"method={preset}", f"model={conf_name}"]) == 0
    rows = _table(capsys.readouterr().out)
    want = expected_counts(preset, model)
    assert rows["method"] == preset
    assert rows["added (paper accounting)"] == f"{want['added']:,}"
    assert rows["reparam: prefix MLP, prompt encoder (training only)"] == f"{want['reparam']:,}"
    assert rows["base model"] == f"{PUBLISHED_BASE[model]:,}"
    percent = 100.0 * (want["added"] + want["trained_base"]) / PUBLISHED_BASE[model]
    assert rows["percent of base"] == f"{percent:.4f}%"


def test_cli_reads_a_yaml_method(tmp_path, capsys):
    path = tmp_path / "q_only.yaml"
    path.write_text("modules:\n  - {form: bottleneck, at: attn.q, insertion: parallel, compose: add, dim: 2,"
                    " activation: none, init: lora}\n")
    assert count_cli.main([f"method={path}", "model=bert_base"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["method"] == "q_only"
    assert rows["added (paper accounting)"] == f"{12 * lora(2, 768, 768):,}"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["method=lorra", "model=bert_base"], "unknown method preset 'lorra'"),
        (["lora"], "cannot read argument 'lora'"),
        (["method=lora", "modell=bert_base"], "cannot read argument 'modell=bert_base'"),
    ],
)
def test_cli_errors_are_one_line(argv, match, capsys):
    assert count_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and match in captured.err
    assert captured.err.count("\n") == 1  # one line, no traceback


def test_cli_entry_point_is_installed():
    script = Path(sys.executable).with_name("unipelt-count")
    if not script.exists():
        pytest.skip("unipelt-count is not installed in this environment")
    result = subprocess.run([str(script), "method=lora", "model=bert_base"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert _table(result.stdout)["added (paper accounting)"] == f"{2 * 12 * lora(8, 768, 768):,}"
