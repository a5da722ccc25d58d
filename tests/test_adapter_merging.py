"""unipelt.adapter_merging against Hugging Face PEFT (add_weighted_adapter, convert_to_lora, (IA)³'s merge), on the
same weights: real PEFT models of tiny BERT (nn.Linear) and GPT-2 (Conv1D, fan_in_fan_out) with three LoRAs of
random nonzero A and B, one of them on fewer modules; PEFT merges, and the same A, B, scales go through our
functions module by module.

Both sides run the same operations on the same values (PEFT's formulas, PEFT's weights rounded to float32, the same
topk / bernoulli / svd calls), so the factors are compared bit for bit (docs/testing.md, rule 1). DARE's masks:
PEFT draws them from torch's global generator after initialising the new adapter from it; the tests route PEFT's
torch.bernoulli calls to a generator seeded as ours, and check that both consumed the same draws. The mathematics
(cat and a full-rank svd give Σ w_i·s_i·ΔW_i, to_lora's error is the discarded singular values) is checked against
plain-torch re-derivations within rule 2's rounding."""

from __future__ import annotations

import warnings

import pytest
import torch
from needs import need_module

from numerics import assert_close_scaled, assert_same
from tiny_models import tiny_model
from unipelt.adapter_merging import (COMBINATIONS, LoraFactors, combine_ia3, lora_delta, merge_module, merge_plan,
                                     to_lora_factors)
from unipelt.errors import AttachError, MethodConfigError

peft = need_module("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402

ADAPTERS = ("a", "b", "c")
WEIGHTS = [0.7, -0.4, 1.3]
TARGETS = {"bert": (["query", "value", "intermediate.dense"], ["query"]),  # a, b everywhere; c on fewer modules
           "gpt2": (["c_attn", "c_fc"], ["c_attn"])}
EQUAL = {"a": (4, 6), "b": (4, 5), "c": (4, 3)}  # name: (r, alpha): scales 1.5, 1.25, 0.75 (not powers of 2)
MIXED = {"a": (2, 3), "b": (4, 5), "c": (3, 2)}
SEED = 1234

CASES = [  # (combination, add_weighted_adapter's keywords); the factor-wise ones need one rank
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9, "svd_full_matrices": False}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
    ("magnitude_prune", {"density": 0.4}),
    ("ties_svd", {"density": 0.5, "svd_rank": 5}),
    ("dare_linear_svd", {"density": 0.5}),
    ("dare_ties_svd", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", {"density": 0.5, "svd_clamp": 0.8}),
]
FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_BASED = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def lora_model(family: str, ranks: dict, dtype=torch.float32):
    """A PEFT model with LoRAs a, b, c (c on fewer modules) of random nonzero A and B."""
    everywhere, fewer = TARGETS[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = None
        for name in ADAPTERS:
            r, alpha = ranks[name]
            config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=fewer if name == "c" else everywhere,
                                     fan_in_fan_out=family == "gpt2")
            if model is None:
                model = peft.get_peft_model(tiny_model(family), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model):
            for name in layer.lora_A:
                for weight in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    weight.copy_(0.3 * torch.randn(weight.shape, generator=g))
    return model.to(dtype).eval()


def lora_layers(model):
    return [module for _, module in model.named_modules() if isinstance(module, LoraLayer)]


_MODELS: dict = {}


def model_for(family: str, combination: str, dtype=torch.float32):
    key = (family, combination in FACTORWISE, dtype)
    if key not in _MODELS:
        _MODELS[key] = lora_model(family, EQUAL if key[1] else MIXED, dtype)
    return _MODELS[key]


def peft_merge(model, combination: str, options: dict, monkeypatch, new: str) -> tuple[list, torch.Tensor]:
    """PEFT's add_weighted_adapter, its torch.bernoulli draws routed to a generator seeded SEED: the shapes of
    the masks drawn, and that generator's state after them."""
    real, generator, draws = torch.bernoulli, torch.Generator().manual_seed(SEED), []

    def routed(probabilities, *args, **kwargs):
        draws.append(tuple(probabilities.shape))
        return real(probabilities, generator=generator)

    monkeypatch.setattr(torch, "bernoulli", routed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(list(ADAPTERS), WEIGHTS, new, combination_type=combination, **options)
    monkeypatch.undo()
    return draws, generator.get_state()


def entries_at(layer) -> dict:
    return {name: LoraFactors(layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(),
                              layer.scaling[name]) if name in layer.lora_A else None for name in ADAPTERS}


def check_against_peft(family: str, combination: str, options: dict, monkeypatch, dtype=torch.float32) -> None:
    model = model_for(family, combination, dtype)
    new = f"merged_{combination}_{len(model.peft_config)}"
    draws, peft_state = peft_merge(model, combination, options, monkeypatch, new)
    plan, rank = merge_plan(combination, [model.peft_config[n].r for n in ADAPTERS], options.get("svd_rank"))
    assert plan == combination and rank == model.peft_config[new].r
    generator = torch.Generator().manual_seed(SEED)
    expected_draws = []
    for name, layer in model.named_modules():  # PEFT's order: its masks are drawn module by module
        if not isinstance(layer, LoraLayer) or new not in layer.lora_A:
            continue
        entries = entries_at(layer)
        a, b = merge_module(entries, WEIGHTS, combination, rank=rank, fan_in_fan_out=layer.fan_in_fan_out,
                            generator=generator, module=name,
                            **{k: v for k, v in options.items() if k != "svd_rank"})
        theirs_a, theirs_b = layer.lora_A[new].weight.detach(), layer.lora_B[new].weight.detach()
        assert theirs_a.abs().max() > 0 and theirs_b.abs().max() > 0, f"{name}: PEFT's merged LoRA is zero"
        # PEFT's svd path leaves its float32 factors in a half-precision adapter; ours keep the adapters' dtype
        assert_same(a, theirs_a.to(dtype), f"{name} lora_A")
        assert_same(b, theirs_b.to(dtype), f"{name} lora_B")
        assert layer.scaling[new] == 1.0
        delta = lora_delta(a, b, 1.0)
        delta = delta.T if layer.fan_in_fan_out else delta
        theirs_delta = layer.get_delta_weight(new).to(dtype)
        if combination not in SVD_BASED:
            assert_same(delta, theirs_delta, f"{name} ΔW")
        elif dtype == torch.bfloat16:  # PEFT's factors stay float32, ours are rounded to bfloat16
            terms = (theirs_b.abs().float() @ theirs_a.abs().float()).max()
            assert_close_scaled(delta, theirs_delta, ops=3, scale=float(terms), msg=f"{name} ΔW",
                                reason="our A and B rounded to bfloat16 (PEFT leaves float32 ones in the adapter), "
                                       "then B·A rounded to bfloat16")
        else:
            assert_close_scaled(delta, theirs_delta, ops=1, msg=f"{name} ΔW",
                                reason="B·A with PEFT's A a column-major view of LAPACK's Vh, ours a row-major "
                                       "copy: another matmul kernel, another order of the rank-k sum")
        if combination.startswith("dare") and options["density"] < 1:
            present = [e for e in entries.values() if e is not None]
            shapes = [tuple(e.a.shape) for e in present] + [tuple(e.b.shape) for e in present]
            if combination.endswith("_svd"):
                out_in = tuple(present[0].b.shape[:1]) + tuple(present[0].a.shape[1:])
                shapes = [out_in[::-1] if layer.fan_in_fan_out else out_in] * len(present)
            expected_draws += shapes
    assert draws == expected_draws, "PEFT drew other DARE masks than merge_module"
    assert torch.equal(generator.get_state(), peft_state), "the two generators drew differently"


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("combination,options", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_each_combination_equals_peft_bit_for_bit(family, combination, options, monkeypatch):
    check_against_peft(family, combination, options, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("combination,options", [("linear", {}), ("cat", {}), ("svd", {}),
                                                 ("ties", {"density": 0.5}), ("dare_ties_svd", {"density": 0.6})])
def test_other_dtypes_equal_peft(dtype, combination, options, monkeypatch):
    """float64 (PEFT's weights are float32 there too) and bfloat16 (PEFT's CPU ΔW in float32, rounded back)."""
    check_against_peft("bert", combination, options, monkeypatch, dtype)


def test_every_combination_is_covered():
    assert {c for c, _ in CASES} == set(COMBINATIONS)


def test_one_adapter_is_merged_linearly_as_in_peft():
    model = model_for("bert", "svd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["b"], [0.8], "single", combination_type="svd", svd_rank=2)
    assert merge_plan("svd", [model.peft_config["b"].r], 2) == ("linear", model.peft_config["single"].r)
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "single" in layer.lora_A:
            a, b = merge_module({"b": entries_at(layer)["b"]}, [0.8], "svd", rank=2, module=name)
            assert_same(a, layer.lora_A["single"].weight.detach(), name)
            assert_same(b, layer.lora_B["single"].weight.detach(), name)


def test_unequal_ranks_are_refused_where_peft_refuses_them():
    with pytest.raises(ValueError, match="same r value"):
        model_for("bert", "svd").add_weighted_adapter(list(ADAPTERS), WEIGHTS, "x", combination_type="ties",
                                                      density=0.5)
    with pytest.raises(AttachError, match="one rank"):
        merge_plan("ties", [2, 4, 3])
    assert merge_plan("cat", [2, 4, 3]) == ("cat", 9) and merge_plan("svd", [2, 4, 3]) == ("svd", 4)


def random_factors(seed: int, ranks=(2, 4, 3), out: int = 12, inp: int = 20, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: LoraFactors(torch.randn(r, inp, generator=g, dtype=dtype), torch.randn(out, r, generator=g,
                                                                                     dtype=dtype), scale)
            for name, r, scale in zip(ADAPTERS, ranks, (1.5, 1.25, 0.7))}


def weighted_sum(entries: dict) -> tuple[torch.Tensor, float]:
    """Σ w_i·s_i·B_i·A_i in plain torch, and the magnitude of its terms."""
    terms = [w * f.scale * (f.b @ f.a) for f, w in zip(entries.values(), WEIGHTS)]
    return sum(terms), sum(float(t.abs().max()) for t in terms)


def test_cat_and_a_full_rank_svd_give_the_weighted_sum_of_the_deltas():
    entries = random_factors(0, dtype=torch.float32)
    expected, terms = weighted_sum(entries)
    a, b = merge_module(entries, WEIGHTS, "cat")
    assert a.shape == (9, 20) and b.shape == (12, 9)
    assert_close_scaled(b @ a, expected, ops=4, scale=terms,
                        reason="(A·w)·s rounded twice, one rank-9 matmul against three rank-r ones, their sum")
    a, b = merge_module(entries, WEIGHTS, "svd", rank=9)  # Σ r_i = 9 <= min(out, in): no information lost
    svd_reason = ("the SVD of a 12×20 matrix (counted as 4: the bidiagonalisation, its QR sweeps and the two "
                  "back-transformations), the product U·S·Vh, the ΔW_i's rounding and weighted sum")
    assert_close_scaled(b @ a, expected, ops=8, scale=terms, reason=svd_reason)
    a, b = merge_module(entries, WEIGHTS, "svd", rank=15)  # above min(out, in) = 12: zero-padded, same ΔW
    assert a.shape == (15, 20) and b.shape == (12, 15) and not a[12:].any() and not b[:, 12:].any()
    assert_close_scaled(b @ a, expected, ops=8, scale=terms, reason=svd_reason)


def test_dare_draws_from_the_global_generator_when_given_none():
    entries = random_factors(1, ranks=(3, 3, 3))
    torch.manual_seed(5)
    global_draw = merge_module(entries, WEIGHTS, "dare_ties", density=0.5)
    seeded = merge_module(entries, WEIGHTS, "dare_ties", density=0.5, generator=torch.Generator().manual_seed(5))
    other = merge_module(entries, WEIGHTS, "dare_ties", density=0.5, generator=torch.Generator().manual_seed(6))
    assert_same(global_draw[0], seeded[0])
    assert_same(global_draw[1], seeded[1])
    assert not torch.equal(global_draw[0], other[0])


def test_to_lora_factors_equals_peft_convert_to_lora():
    config = peft.LoHaConfig(r=4, alpha=4, target_modules=["query", "value"], init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_model("bert"), config).eval()
        _, state = peft.convert_to_lora(model, rank=3)
    for name, module in model.named_modules():
        if hasattr(module, "hada_w1_a"):
            delta = module.get_delta_weight("default").detach()
            a, b, error = to_lora_factors(delta, 3, module=name)
            assert_same(a, state[f"{name}.lora_A.weight"], name)
            assert_same(b, state[f"{name}.lora_B.weight"], name)
            s = torch.linalg.svdvals(delta.double())
            assert_close_scaled(error, float((s[3:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), ops=2,
                                dtype=torch.float32, reason="||ΔW − BA|| from float32 factors against the "
                                "norm of the discarded singular values, both relative to ||ΔW||")
            assert 0.05 < error < 1  # a LoHa of r = 4 has rank up to 16: rank 3 loses something


def test_to_lora_factors_is_exact_at_the_rank_of_the_delta_and_zero_for_zero():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(16, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 24, generator=g,
                                                                               dtype=torch.float64)
    a, b, error = to_lora_factors(delta, 3)
    assert_close_scaled(b @ a, delta, ops=6, reason="the SVD of a 16×24 matrix (counted as 4: the "
                        "bidiagonalisation, its QR sweeps, the two back-transformations) and the product B·A")
    assert error < 6 * 4 * torch.finfo(torch.float64).eps  # the same rounding, relative to ||ΔW||
    a, b, error = to_lora_factors(delta, 20)  # above min(out, in): zero-padded
    assert a.shape == (20, 24) and b.shape == (16, 20) and not b[:, 16:].any()
    a, b, error = to_lora_factors(torch.zeros(5, 7), 2)
    assert error == 0.0 and not (b @ a).any()


def test_dense_deltas_join_the_svd_combinations():
    """An adapter that is not a LoRA enters as its ΔW: the same result as its LoRA factors' ΔW."""
    entries = random_factors(3, dtype=torch.float32)
    dense = dict(entries, c=entries["c"].delta())
    for combination, options in [("svd", {}), ("ties_svd", {"density": 0.5}), ("dare_linear_svd", {"density": 0.5})]:
        ours = merge_module(dense, WEIGHTS, combination, rank=4, generator=torch.Generator().manual_seed(1),
                            **options)
        factors = merge_module(entries, WEIGHTS, combination, rank=4, generator=torch.Generator().manual_seed(1),
                               **options)
        assert_same(ours[0], factors[0], combination)
        assert_same(ours[1], factors[1], combination)


def test_ia3_vectors_combine_as_peft_does():
    config = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_model("bert"), peft.IA3Config(**config), adapter_name="a")
        model.add_adapter("b", peft.IA3Config(**config))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=g))
    model.add_weighted_adapter(["a", "b"], [0.6, 0.5], "m")
    count = 0
    for name, module in model.named_modules():
        if hasattr(module, "ia3_l") and "m" in module.ia3_l:
            vectors = {n: module.ia3_l[n].detach() for n in ("a", "b")}
            assert_same(combine_ia3(vectors, [0.6, 0.5], module=name), module.ia3_l["m"].detach(), name)
            count += 1
    assert count == 4 * model.config.num_hidden_layers  # key, value, the attention's and the FFN's output.dense


def _bad(**changes):
    entries = random_factors(5, ranks=(3, 3, 3), dtype=torch.float32)
    call = dict(entries=entries, weights=WEIGHTS, combination="ties", density=0.5, module="layer.0.q")
    call.update(changes)
    return lambda: merge_module(call.pop("entries"), call.pop("weights"), call.pop("combination"), **call)


def _entries_with(name: str, **fields) -> dict:
    entries = random_factors(5, ranks=(3, 3, 3), dtype=torch.float32)
    old = entries[name]
    entries[name] = LoraFactors(fields.get("a", old.a), fields.get("b", old.b), fields.get("scale", old.scale))
    return entries


NAN_A = torch.full((3, 20), float("nan"))
BAD = [  # (call, error, words the one line must contain)
    (_bad(combination="average"), MethodConfigError, ["'average'", "linear"]),
    (_bad(weights=[1.0, 2.0]), MethodConfigError, ["2 entries", "3 adapters"]),
    (_bad(weights=[1.0, float("inf"), 2.0]), MethodConfigError, ["weight 1"]),
    (_bad(density=0.0), MethodConfigError, ["density 0.0", "(0, 1]"]),
    (_bad(density=1.5), MethodConfigError, ["density 1.5"]),
    (_bad(density=None), MethodConfigError, ["'ties'", "density"]),
    (_bad(combination="linear"), MethodConfigError, ["'linear'", "does not prune"]),
    (_bad(majority_sign_method="mean"), MethodConfigError, ["'mean'", "frequency"]),
    (_bad(combination="svd", density=None, rank=0), MethodConfigError, ["rank 0"]),
    (_bad(svd_clamp=0.9), MethodConfigError, ["svd_clamp", "'ties'"]),
    (_bad(combination="svd", density=None, svd_driver="gesvdj"), MethodConfigError, ["CUDA", "layer.0.q"]),
    (_bad(entries=_entries_with("b", a=torch.randn(3, 21))), AttachError, ["'layer.0.q'", "'b'", "[12, 21]"]),
    (_bad(entries=_entries_with("c", a=torch.randn(2, 20), b=torch.randn(12, 2))), AttachError,
     ["'c': 2", "one rank"]),
    (_bad(entries=_entries_with("b", b=torch.randn(12, 4))), AttachError, ["'b'", "rank"]),
    (_bad(entries=_entries_with("c", a=NAN_A)), AttachError, ["'c'", "lora A", "NaN"]),
    (_bad(entries=_entries_with("a", scale=float("nan"))), AttachError, ["'a'", "scale"]),
    (_bad(entries=_entries_with("a", a=torch.randn(3, 20, dtype=torch.float64))), AttachError, ["'a'", "dtype"]),
    (_bad(entries={"a": None, "b": None, "c": None}), AttachError, ["none of the adapters"]),
    (_bad(entries=dict(random_factors(5, dtype=torch.float32), b=torch.randn(12, 20))), AttachError,
     ["'b'", "dense ΔW", "'ties'"]),
    (_bad(combination="svd", density=None, entries={"a": torch.randn(12, 20), "b": None, "c": None}),
     MethodConfigError, ["dense", "give rank"]),
    (lambda: merge_module([torch.randn(4, 5)], [1.0], "svd", module="m.q"), MethodConfigError, ["m.q", "dict"]),
    (lambda: to_lora_factors(torch.randn(4, 5), 0, module="m.q"), MethodConfigError, ["m.q", "rank 0"]),
    (lambda: to_lora_factors(torch.full((4, 5), float("inf")), 2, module="m.q"), AttachError, ["m.q", "NaN or inf"]),
    (lambda: to_lora_factors(torch.randn(4, 5, 6), 2), AttachError, ["2-D"]),
    (lambda: merge_plan("cat", [2, 0]), MethodConfigError, ["rank 0", "adapter 1"]),
    (lambda: combine_ia3({"a": torch.ones(4), "b": torch.ones(5)}, [1.0, 1.0], module="k"), AttachError,
     ["'b'", "(5,)"]),
]


@pytest.mark.parametrize("call,error,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs_are_refused_in_one_line_naming_the_culprit(call, error, words):
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
