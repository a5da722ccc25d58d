"""Composition blocks and AdapterFusion (the fusion form) against independent references, on the same weights.

1. A plain-torch re-derivation, always run: every layer's hidden states computed by hand from the adapters' weights
   by forward hooks of this file on a deep copy of the base that holds no unipelt module. Stack, Parallel, Average
   and BatchSplit of sequential bottleneck adapters (at attn and ffn), of LoRAs (attn.q, attn.v) and of Pfeiffer
   adapters (ffn.ln, the LayerNorm applied again), and the fusion form over the first and the last.
2. AdapterHub `adapters` itself, from a second venv (.venv-adapterhub, or UNIPELT_ADAPTERHUB_PYTHON; see
   benchmarks/adapterhub_composition.py): tests/test_composition_adapterhub.py.
3. The fusion form's invariants (members frozen and unchanged, counts, save / load, deletion) and bad inputs, each
   refused in one line with nothing changed.

Tolerance (tests/numerics.py, rule 2): the hand side computes each adapter's up projection and its add to h
separately where ours runs them as one addmm, and the fusion's products in another order: `ops` counts those
operations over every site of both layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unipelt
from numerics import assert_close_scaled, assert_differs, assert_same
from tiny_models import perturb_adapters, tiny_batch, tiny_model
from unipelt.attach import state_of
from unipelt.optim import training_state

ACT = {"relu": F.relu, "none": lambda t: t}
# site -> (module under each BERT / RoBERTa layer, how h is read): seq reads h, par reads x, norm reads LN(z)
SITES = {"attn": ("attention.output.dense", "seq"), "ffn": ("output.dense", "seq"),
         "ffn.ln": ("output.LayerNorm", "norm"), "attn.q": ("attention.self.query", "par"),
         "attn.v": ("attention.self.value", "par")}
KINDS = {
    "sequential": {"form": "bottleneck", "at": ["attn", "ffn"], "insertion": "sequential", "compose": "add",
                   "dim": 8, "activation": "relu"},
    "lora": {"form": "bottleneck", "at": ["attn.q", "attn.v"], "insertion": "parallel", "compose": "scale",
             "alpha": 16, "dim": 4, "activation": "none", "init": "lora"},
    "pfeiffer": {"form": "bottleneck", "at": "ffn.ln", "insertion": "sequential", "compose": "add",
                 "reduction_factor": 4, "activation": "relu"},
}
FUSION = {"form": "fusion", "insertion": "sequential", "compose": "add", "adapters": ["a", "b"]}


def method(kind: str, **changes) -> dict:
    """A task adapter without a head of its own (train_head false), so that several can act on the same rows."""
    return {"name": kind, "train_head": False, "modules": [{**KINDS[kind], **changes}]}


def fusion_method(at, **options) -> dict:
    return {"name": "adapter_fusion", "modules": [{**FUSION, "at": at, **options}]}


def model_with(kind: str, names=("a", "b", "c"), family: str = "bert"):
    """(a deep copy of the bare base, the base with adapters `names` of `kind` moved off their init)."""
    model = tiny_model(family, attn="eager")
    base = copy.deepcopy(model)
    for index, name in enumerate(names):
        torch.manual_seed(10 + index)
        unipelt.attach(model, method(kind), name=name)
    perturb_adapters(model, scale=0.3)
    return base, model


def weights(model, name: str) -> dict:
    """(layer, site) -> plain copies of the adapter's tensors there: a bottleneck's (with its activation and scale)
    or a fusion layer's."""
    state = state_of(model, name)
    out = {}
    for p, slot in zip(state.placements, state.slots.values()):
        f = slot.delta_module
        if p.spec.form == "fusion":
            layers = {"query": f.query, "key": f.key, "value": f.value}
            scale, act = None, None
        else:
            layers = {"down": f.down, "up": f.up}
            scale = float(p.spec.scale) if p.spec.compose == "scale" else 1.0
            act = p.spec.options.activation
        take = {"scale": scale, "act": act}
        for key, layer in layers.items():
            take[f"{key}_w"] = layer.weight.detach().clone()
            take[f"{key}_b"] = None if layer.bias is None else layer.bias.detach().clone()
        out[(p.layer, p.site)] = take
    return out


def delta(w: dict, u: torch.Tensor) -> torch.Tensor:
    return w["scale"] * F.linear(ACT[w["act"]](F.linear(u, w["down_w"], w["down_b"])), w["up_w"], w["up_b"])


def fused(f: dict, members: list[dict], u: torch.Tensor) -> torch.Tensor:
    """Pfeiffer et al.'s AdapterFusion: softmax_i(W_q u · W_k v_i) weighting W_v v_i, v_i = member i's Δh(u)."""
    v = torch.stack([delta(w, u) for w in members], dim=-2)
    q, k = F.linear(u, f["query_w"], f["query_b"]), F.linear(v, f["key_w"], f["key_b"])
    alpha = torch.einsum("...d,...nd->...n", q, k).softmax(dim=-1)
    return torch.einsum("...n,...nd->...d", alpha, F.linear(v, f["value_w"]))


def combine(block: tuple, W: dict, at: tuple, s0: torch.Tensor, x: torch.Tensor, read) -> torch.Tensor:
    """The composed value at one site by hand. block: ("stack", names) each reading the previous output,
    ("parallel" | "average", names, weights) all reading s0, ("split", [(block, rows), ...]) rows in order to
    blocks, ("fuse", names, fusion name)."""
    kind = block[0]
    if kind == "stack":
        s = s0
        for name in block[1]:
            s = s + delta(W[name][at], read(s, x))
        return s
    if kind in ("parallel", "average"):
        u = read(s0, x)
        factors = block[2] if kind == "average" else [1.0] * len(block[1])
        return s0 + sum(c * delta(W[name][at], u) for name, c in zip(block[1], factors))
    if kind == "fuse":
        return s0 + fused(W[block[2]][at], [W[name][at] for name in block[1]], read(s0, x))
    pieces, start = [], 0
    for inner, size in block[1]:
        rows = slice(start, start + size)
        pieces.append(combine(inner, W, at, s0[rows], x[rows], read))
        start += size
    return torch.cat(pieces)


def by_hand(base, W: dict, block: tuple, sites) -> torch.nn.Module:
    """A deep copy of the bare base whose hooks compute `block` at `sites` of every layer from the weights W."""
    copy_ = copy.deepcopy(base)
    for index, layer in enumerate(copy_.base_model.encoder.layer):
        for site in sites:
            path, kind = SITES[site]

            def hook(module, args, output, at=(index, site), kind=kind):
                x = args[0]
                if kind == "norm":
                    def ln(t):
                        return F.layer_norm(t, module.normalized_shape, module.weight, module.bias, module.eps)
                    return ln(combine(block, W, at, x, x, lambda s, _: ln(s)))
                read = (lambda s, x: x) if kind == "par" else (lambda s, x: s)
                return combine(block, W, at, output, x, read)
            layer.get_submodule(path).register_forward_hook(hook)
    return copy_


def hidden(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return torch.stack(out.hidden_states)


BLOCKS = {  # id -> (ours, by hand, adapter terms per site)
    "stack": (unipelt.Stack("a", "b", "c"), ("stack", ["a", "b", "c"]), 3),
    "parallel": (unipelt.Parallel("a", "b"), ("parallel", ["a", "b"]), 2),
    "average": (unipelt.Average("a", "b", "c", weights=[0.5, 0.3, 0.2]), ("average", ["a", "b", "c"], [0.5, 0.3, 0.2]),
                3),
    "batch_split": (unipelt.BatchSplit("c", "a", "b", sizes=[1, 1, 1]),
                    ("split", [(("stack", ["c"]), 1), (("stack", ["a"]), 1), (("stack", ["b"]), 1)]), 1),
    "stack_in_split": (unipelt.BatchSplit(unipelt.Stack("b", "a"), "c", sizes=[2, 1]),
                       ("split", [(("stack", ["b", "a"]), 2), (("stack", ["c"]), 1)]), 2),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("block_id", list(BLOCKS))
def test_blocks_equal_the_hand_rederivation(kind, block_id):
    base, model = model_with(kind)
    batch = tiny_batch("bert", batch=3)
    ours, hand, terms = BLOCKS[block_id]
    W = {name: weights(model, name) for name in ("a", "b", "c")}
    sites = KINDS[kind]["at"] if isinstance(KINDS[kind]["at"], list) else [KINDS[kind]["at"]]
    unipelt.set_active(model, ours)
    got = hidden(model, batch)
    expected = hidden(by_hand(base, W, hand, sites), batch)
    assert_differs(got, hidden(base, batch), ops=1, reason="the adapters change the hidden states")
    assert_close_scaled(got, expected, ops=terms * len(sites) * 2,
                        reason="each adapter's up projection and add (one addmm here) at every site of both layers")


@pytest.mark.parametrize("kind, at", [("pfeiffer", "ffn.ln"), ("sequential", ["attn", "ffn"])],
                         ids=["pfeiffer", "sequential"])
def test_fusion_equals_the_hand_rederivation(kind, at):
    base, model = model_with(kind, names=("a", "b"))
    unipelt.attach(model, fusion_method(at), name="fusion")
    perturb_adapters(model, seed=5, scale=0.3)  # the fusion layers too (W_v off the identity)
    batch = tiny_batch("bert", batch=3)
    W = {name: weights(model, name) for name in ("a", "b", "fusion")}
    sites = at if isinstance(at, list) else [at]
    got = hidden(model, batch)
    expected = hidden(by_hand(base, W, ("fuse", ["a", "b"], "fusion"), sites), batch)
    with unipelt.disabled(model, name="fusion"):
        assert_differs(got, hidden(model, batch), ops=1, reason="the fusion changes the hidden states")
    assert_close_scaled(got, expected, ops=4 * len(sites) * 2,
                        reason="the members' up projections, q·k, softmax, the value products and the sum in another "
                               "order, at every site of both layers")


def test_fusion_trains_only_its_own_layers_and_leaves_the_members_unchanged(tmp_path):
    base, model = model_with("pfeiffer", names=("a", "b"))
    members = copy.deepcopy(model)
    unipelt.attach(model, "adapter_fusion", name="fusion")
    assert unipelt.active_adapters(model) == "fusion"
    batch = tiny_batch("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "unipelt_fusion__" not in n}
    groups = unipelt.param_groups(model, 1e-2, name="fusion")
    assert all("unipelt_fusion__" in n or n.startswith("classifier") for g in groups for n in g["names"])
    optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(**batch).loss + unipelt.regularization_loss(model, name="fusion")
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == ("unipelt_fusion__" in n or n.startswith("classifier")), n
        optimizer.step()
    model.eval()
    for n, p in model.named_parameters():
        if n in before and not n.startswith("classifier"):
            assert torch.equal(p, before[n]), n
    assert unipelt.count_parameters(model, name="fusion")["added"] == \
        unipelt.count_parameters(model.config, "adapter_fusion")["added"]
    # save / load onto the same members elsewhere; deleting the fusion gives back the members as they were
    trained = hidden(model, batch)
    unipelt.save_adapter(model, tmp_path, name="fusion")
    fresh = copy.deepcopy(members)
    unipelt.load_adapter(fresh, tmp_path, name="fusion")
    assert_same(hidden(fresh, batch), trained)
    copied = copy.deepcopy(model)  # its hooks and its fusion read the copy's own members
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "unipelt_a__" in n:
                p.mul_(2)
    assert_same(hidden(copied, batch), trained)
    unipelt.delete_adapter(fresh, "fusion")
    unipelt.set_active(members, "b")
    unipelt.set_active(fresh, "b")
    assert_same(hidden(fresh, batch), hidden(members, batch))
    with unipelt.disabled(fresh):
        assert_same(hidden(fresh, batch), hidden(base, batch))


def test_fusion_beside_its_members_on_other_rows():
    """BatchSplit: the fusion on row 0, member b alone on rows 1-2; equal to each alone on its rows."""
    _, model = model_with("pfeiffer", names=("a", "b"))
    unipelt.attach(model, "adapter_fusion", name="fusion")
    perturb_adapters(model, seed=6, scale=0.3)
    batch = tiny_batch("bert", batch=3)
    fusion_alone = hidden(model, batch)
    unipelt.set_active(model, "b")
    b_alone = hidden(model, batch)
    unipelt.set_active(model, unipelt.BatchSplit("fusion", "b", sizes=[1, 2]))
    got = hidden(model, batch)
    reason = "one or two rows against three through each matmul"
    assert_close_scaled(got[:, 1:], b_alone[:, 1:], ops=2, reason=reason)
    assert_close_scaled(got[:, :1], fusion_alone[:, :1], ops=2, reason=reason)
    with unipelt.mixed_batch(model, ["b", "fusion", None]):
        mixed = hidden(model, batch)
    assert_close_scaled(mixed[:, 0], b_alone[:, 0], ops=2, reason=reason)
    assert_close_scaled(mixed[:, 1], fusion_alone[:, 1], ops=2, reason=reason)
    with unipelt.disabled(model):
        assert_close_scaled(mixed[:, 2], hidden(model, batch)[:, 2], ops=2, reason=reason)


def one_line(match: str, call) -> None:
    with pytest.raises(unipelt.AttachError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


MEMBERS = {"lora": method("lora"), "prefix": {**unipelt.load_method("prefix").to_dict(), "train_head": False},
           "seq": method("sequential"), "half": method("pfeiffer", layers=[1])}


@pytest.mark.parametrize("members, fusion, match", [
    (["a"], {}, "no adapter named 'b' on this model to fuse"),
    (["a", "lora"], {"adapters": ["a", "lora"]}, "adapter 'lora' module 'm0' is a parallel adapter"),
    (["a", "prefix"], {"adapters": ["a", "prefix"]}, "adapter 'prefix' module 'm0' is a 'prefix' module"),
    (["a", "b"], {"at": ["attn", "ffn"]}, r"adapter 'a' module 'm0' sits at 'ffn.ln' of encoder layer 0, which this "
                                          "fusion does not cover"),
    (["a", "b"], {"layers": [1]}, "which this fusion does not cover"),
    (["a", "seq"], {"adapters": ["a", "seq"]}, "adapter 'seq' module 'm0' sits at 'attn'"),
    (["a", "half"], {"adapters": ["a", "half"]}, "adapter 'half' has no module at 'ffn.ln' of encoder layer 0"),
])
def test_fusion_bad_members_are_one_line_and_change_nothing(members, fusion, match):
    model = tiny_model("bert")
    for name in members:
        unipelt.attach(model, MEMBERS.get(name, method("pfeiffer")), name=name)
    before = unipelt.list_adapters(model), unipelt.active_adapters(model)
    spec = fusion_method(fusion.get("at", "ffn.ln"), adapters=fusion.get("adapters", ["a", "b"]))
    spec["modules"][0].update({k: v for k, v in fusion.items() if k == "layers"})
    one_line(match, lambda: unipelt.attach(model, spec, name="fusion"))
    assert (unipelt.list_adapters(model), unipelt.active_adapters(model)) == before


def test_fused_members_cannot_go_or_act_twice():
    _, model = model_with("pfeiffer", names=("a", "b"))
    unipelt.attach(model, "adapter_fusion", name="fusion")
    batch = tiny_batch("bert")
    out = hidden(model, batch)
    one_line("delete_adapter: adapter 'a' is fused by adapter 'fusion', which runs it; delete 'fusion' first",
             lambda: unipelt.delete_adapter(model, "a"))
    one_line("detach: adapter 'b' is fused by adapter 'fusion'", lambda: unipelt.detach(model, name="b"))
    one_line("rename_adapter: adapter 'a' is fused by adapter 'fusion'",
             lambda: unipelt.rename_adapter(model, "a", "x"))
    one_line("set_active: adapter 'fusion' runs 'a' itself .* would add its Δh twice",
             lambda: unipelt.set_active(model, ["a", "fusion"]))
    one_line("runs 'b' itself", lambda: unipelt.set_active(model, unipelt.Stack("fusion", "b")))
    assert unipelt.list_adapters(model) == ["a", "b", "fusion"] and unipelt.active_adapters(model) == "fusion"
    assert_same(hidden(model, batch), out)
    unipelt.delete_adapter(model, "fusion")  # then the members may go
    unipelt.delete_adapter(model, "a")
    assert unipelt.list_adapters(model) == ["b"]


@pytest.mark.parametrize("options, match", [
    ({"adapters": []}, "expected a non-empty list of adapter names"),
    ({"adapters": ["a", "a"]}, "adapter 'a' is listed twice"),
    ({"residual_before": True}, "residual_before adds the sub-layer output before its residual"),
    ({"temperature": "yes"}, "temperature: expected bool"),
])
def test_fusion_options_are_checked_when_loaded(options, match):
    with pytest.raises(unipelt.MethodConfigError, match=match):
        unipelt.load_method(fusion_method("ffn.ln", **options))


def test_fusion_regularization_and_temperature():
    _, model = model_with("pfeiffer", names=("a", "b"))
    unipelt.attach(model, fusion_method("ffn.ln", temperature=True), name="fusion")
    layers = [slot.delta_module for slot in state_of(model, "fusion").slots.values()]
    expected = sum(0.01 * (torch.eye(32) - f.value.weight).pow(2).sum() for f in layers)
    assert_close_scaled(unipelt.regularization_loss(model, name="fusion"), expected, ops=2,
                        reason="the same sum of squares over the sites in another order")
    assert all(f.temperature == 50.0 for f in layers)
    hidden(model, tiny_batch("bert"))  # evaluation does not anneal
    model.train()
    model(**tiny_batch("bert"))
    assert all(f.temperature == pytest.approx(49.95) for f in layers)
    assert training_state(model, name="fusion")  # carried by a resumable checkpoint
