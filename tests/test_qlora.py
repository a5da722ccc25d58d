"""QLoRA: NF4 quantization error against a reference NF4 computed here, the preset, the 4-bit base built at
attach (CPU path of bitsandbytes), disabled = the quantized base, the clean error without bitsandbytes, and
merge into a 4-bit base (requantization warning, measured rounding error, exact unmerge)."""

from __future__ import annotations

import copy

import pytest
from needs import need_module
import torch

import unipelt
from numerics import assert_close_scaled, assert_same, tolerance
from unipelt.attach import state_of
from tiny_models import tiny_batch, tiny_model

bnb = need_module("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

BLOCK = 64


def reference_nf4_codebook() -> torch.Tensor:
    """NF4 (Dettmers et al. 2023): quantiles of N(0, 1), 8 positive and 7 negative plus an exact zero, scaled to
    [-1, 1]; the outer quantile is at (1 + 0.9355) / 2 (the paper's offset 0.9677)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    return (values / values.abs().max()).sort().values.float()


def reference_nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """Blockwise absmax scaling, nearest NF4 code, rescale."""
    code = reference_nf4_codebook()
    blocks = weight.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    index = (blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(dim=-1)
    return (code[index] * absmax).reshape(weight.shape)


def test_bitsandbytes_nf4_matches_the_reference_and_the_error_bound():
    code = reference_nf4_codebook()
    assert_close_scaled(bnbf.get_4bit_type("nf4", device="cpu").float(), code, ops=2,
                        reason="bitsandbytes' table of the codes as float32 constants; our float64 quantiles "
                               "rounded to float32")
    torch.manual_seed(0)
    weight = torch.randn(128, 256)
    packed, state = bnbf.quantize_4bit(weight, blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
    round_trip = bnbf.dequantize_4bit(packed, state)
    assert_close_scaled(round_trip, reference_nf4_round_trip(weight), ops=2,
                        reason="the code tables' float32 rounding (above) and code · absmax")
    # Nearest-code rounding: every weight is within half the widest code gap of its block's absmax, up to the
    # rounding of code · absmax, of the difference and of half_gap · absmax (each at the size of absmax)
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    absmax = weight.reshape(-1, BLOCK).abs().amax(dim=1, keepdim=True)
    error = (round_trip - weight).reshape(-1, BLOCK).abs()
    assert (error <= absmax * (half_gap + tolerance(1.0, ops=3, dtype=torch.float32))).all()
    relative_rms = (error.pow(2).mean() / weight.pow(2).mean()).sqrt().item()
    assert 0.05 < relative_rms < 0.15  # NF4 on Gaussian weights: about 10 % RMS error
    # Double quantization (8-bit block scales) adds well under 1 % of absmax on top.
    packed2, state2 = bnbf.quantize_4bit(weight, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
    error2 = (bnbf.dequantize_4bit(packed2, state2) - weight).reshape(-1, BLOCK).abs()
    assert (error2 <= (half_gap + 0.01) * absmax).all()


def test_preset_and_config_keys():
    spec = unipelt.load_method("qlora")
    assert (spec.quantize, spec.compute_dtype, spec.double_quant, spec.optimizer) == \
        ("nf4", "bfloat16", True, "paged_adamw_32bit")
    assert spec.modules[0].at == ("all_linear",) and spec.modules[0].init == "lora"
    assert unipelt.load_method(spec.to_dict()) == spec
    with pytest.raises(unipelt.MethodConfigError, match="quantize: unknown value 'int3'"):
        unipelt.load_method({**spec.to_dict(), "quantize": "int3"})
    with pytest.raises(unipelt.MethodConfigError, match="optimizer"):
        unipelt.load_method({**spec.to_dict(), "optimizer": "sgd_4bit"})
    with pytest.raises(unipelt.MethodConfigError, match="train_base"):
        unipelt.load_method({**spec.to_dict(), "train_base": "all"})


def _quantized_reference(model):
    """The base with every projection replaced by a Linear4bit built here (not through unipelt)."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layer." in name:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=True,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, blocksize=BLOCK,
                                             compress_statistics=True, quant_type="nf4", module=layer).to("cpu")
            layer.bias = torch.nn.Parameter(module.bias.data.clone())
            layer.support_avx512bf16_for_cpu = False
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, layer)
    return reference


def test_attach_quantizes_every_projection_and_disabled_is_the_4bit_base():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    reference = _quantized_reference(model)
    unipelt.attach(model, "qlora")
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(four_bit) == 2 * 6  # q, k, v, o, up, down in each of the two layers
    for module in four_bit.values():
        assert module.weight.quant_type == "nf4" and module.weight.compress_statistics
        assert module.compute_dtype == torch.bfloat16
    assert len(state_of(model).slots) == 12  # LoRA on all linear layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("unipelt_" in n or n.startswith("classifier") for n in trainable)
    with torch.no_grad(), unipelt.disabled(model):
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
    counts = unipelt.count_parameters(model)
    assert counts["base"] == sum(p.numel() for p in tiny_model("bert").base_model.parameters())


def test_without_bitsandbytes_attach_fails_cleanly_and_changes_nothing(monkeypatch):
    import unipelt.quantize as quantize

    real = quantize.importlib.util.find_spec
    monkeypatch.setattr(quantize.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(unipelt.AttachError, match="needs bitsandbytes"):
        unipelt.attach(model, "qlora")
    assert not unipelt.is_attached(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_merge_into_4bit_warns_reports_rounding_and_unmerge_is_exact():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    unipelt.attach(model, "qlora")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "unipelt_" in name:
                param.normal_(std=0.05)
    out = model(**batch).logits
    packed = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # An FFN down-projection (rows of 64 = one NF4 block): bitsandbytes 0.50's CPU dequantize is off for rows
    # shorter than the block size, which only tiny test models have.
    slot_name, slot = next((n, s) for n, s in state_of(model).slots.items() if s.site == "ffn.down")
    host = model.get_submodule(slot_name.rpartition(".")[0])
    expected_target = bnbf.dequantize_4bit(host.weight.data, host.weight.quant_state).float()
    delta = (slot.linear_map().weight * slot.composer.factor(None)).detach()
    expected_target += delta
    with pytest.warns(UserWarning, match="rounding error"):
        report = unipelt.merge(model)
    assert sorted(report["rounding_error"]) == sorted(report["merged"]) and len(report["merged"]) == 12
    measured = (bnbf.dequantize_4bit(host.weight.data, host.weight.quant_state).float() - expected_target).abs().max()
    # the same requantized weights against the same float32 target deQ(W) + s·ΔW, formed as the fold forms it
    assert_same(report["rounding_error"][slot_name], measured.item())
    assert 0 < measured.item() < 0.2 * expected_target.abs().max().item()
    unipelt.unmerge(model)
    for name, module in model.named_modules():
        if name in packed:
            assert torch.equal(module.weight.data, packed[name])
    assert torch.equal(model(**batch).logits, out)
