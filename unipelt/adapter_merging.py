"""Combining LoRA-type adapters into a new LoRA, and a dense ΔW as LoRA factors (issue 20, items 4 and 5).

Pure functions on one module's tensors, no model state: the caller gathers, for one projection, each adapter's
entry and gets the new adapter's factors back. An entry is `LoraFactors(a, b, scale)` (ΔW = scale·B·A, A [r, in],
B [out, r]), a dense ΔW [out, in] with its scale applied (an adapter that is not a LoRA: (IA)³, a DoRA direction,
any linear ΔW), or None (the adapter has no module here; skipped, as PEFT skips it). The result (A, B) is a LoRA
of scale 1, as PEFT's merged adapter (lora_alpha = r).

The combinations are PEFT's `LoraModel.add_weighted_adapter` (peft 0.21), computed by the same operations on the
same values, so that the factors equal PEFT's bit for bit (tested in float32, float64 and bfloat16, on the CPU):
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine the A's and, separately, the B's (all
  of one rank r). Adapter i's weight enters as the factor sqrt(|w_i·s_i|) on both sides, its sign on A only; the
  pruning / sign election / DARE masks act on each factor matrix on its own. This is PEFT's (rough) approximation:
  B'A' is not Σ w_i·s_i·B_i·A_i. The new rank is r.
- `cat`: A' = [ (A_i·w_i)·s_i ; ... ] stacked by rows, B' = [B_1 ... B_n] by columns: B'A' = Σ w_i·s_i·B_i·A_i
  exactly; the new rank is Σ r_i.
- `svd` and the `*_svd` variants combine the ΔW_i = s_i·B_i·A_i (dense entries as given) with `linear` / `ties` /
  `dare_*` / `magnitude_prune`, then keep the truncated SVD: B' = U_k·diag(S_k), A' = the first k rows of Vh
  (k = `rank`, by default the largest rank of the LoRA entries). `svd_clamp` q clamps both to [−c, c], c the
  q-quantile of their (signed) values together, as PEFT does.
- PEFT merges one adapter with `linear` whatever the combination asked (a single LoRA entry does the same here).

Pruning (`density` d in (0, 1]): magnitude keeps the int(d·numel) largest |values| (torch.topk); DARE keeps each
value with probability d (torch.bernoulli) and divides the kept ones by d; d = 1 keeps everything and draws nothing.
TIES's sign election (`majority_sign_method`): `total` takes the sign of the sum of the pruned, unweighted tensors,
`frequency` the more frequent sign (a tie is +); only values of that sign are summed, weighted, and divided by how
many there are.

DARE's random masks. PEFT draws them with torch.bernoulli from torch's global generator: per module (in
model.named_modules() order), for the factor-wise combinations the A of every adapter and then the B of every
adapter, for the svd-based ones the ΔW of every adapter. merge_module draws the same masks in the same order from
`generator` (torch's global generator when None), so calling it over the modules in PEFT's order with a
torch.Generator seeded as PEFT's global generator was at its first draw gives PEFT's masks. PEFT's
add_weighted_adapter first initialises the new adapter's tensors from the global generator, so
tests/test_adapter_merging.py routes PEFT's torch.bernoulli calls to a generator seeded like ours. A generator
must live on the tensors' device.

Where this differs from PEFT on purpose (the caller sees PEFT's result otherwise):
- PEFT's svd path assigns float32 factors to a float16 / bfloat16 adapter (changing its dtype); here they are cast
  to the adapters' dtype. PEFT computes a half-precision ΔW_i in float32 on the CPU but in half precision on CUDA;
  here always in float32, rounded to the adapters' dtype (PEFT's CPU result).
- `rank` above min(out, in) in the svd path: PEFT returns factors of mismatched ranks; here the missing rank is
  zero rows of A and zero columns of B (the same ΔW). `cat` pads to `rank` the same way (PEFT pads a module that
  lacks an adapter to the sum of the configs' ranks).
- PEFT rounds the weights to float32 (a tensor of the Python list) even for float64 adapters; so does this module,
  to stay equal to it. to_lora_factors, whose anchor is convert_to_lora, keeps float64 in float64 (PEFT's
  conversion computes in float32) and pads a rank above min(out, in) with zeros (PEFT refuses it).
- Options a combination does not use (a density for `linear`, svd_clamp for `ties`) are refused, not ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import AttachError, MethodConfigError, allowed

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_BASED = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = FACTORWISE + ("cat",) + SVD_BASED
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")

# What each base combination does to every tensor before the weighted sum, and whether it elects a sign.
_PRUNE = {"linear": None, "ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random",
          "dare_ties": "random"}
_ELECTS = ("ties", "dare_ties")


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's LoRA at one module: ΔW = scale · b @ a, a [r, in], b [out, r]."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """scale·B·A [out, in], as PEFT's get_delta_weight: float16 / bfloat16 computed in float32, rounded back."""
        return lora_delta(self.a, self.b, self.scale)


Entry = LoraFactors | torch.Tensor | None


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """(b @ a) · scale; half-precision factors are multiplied in float32 and the result rounded to their dtype."""
    half = a.dtype in (torch.float16, torch.bfloat16)
    product = b.float() @ a.float() if half else b @ a
    product = product * scale
    return product.to(a.dtype) if half else product


def _base(combination: str) -> str:
    return "linear" if combination in ("svd", "cat") else combination.removesuffix("_svd")


def _check_options(combination, n, weights, density, majority_sign_method, rank, svd_clamp, svd_driver) -> None:
    if not isinstance(combination, str) or combination not in COMBINATIONS:
        raise MethodConfigError(f"merge: unknown combination {combination!r}; allowed: {allowed(COMBINATIONS)}")
    if n < 1:
        raise MethodConfigError("merge: no adapters to combine")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise MethodConfigError(f"merge: weights is a {type(weights).__name__}; give a list of numbers")
    if len(weights) != n:
        raise MethodConfigError(f"merge: weights has {len(weights)} entries for {n} adapters; "
                                "give one weight per adapter")
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise MethodConfigError(f"merge: weight {index} is {weight!r}; weights are finite numbers")
    pruning = _PRUNE[_base(combination)] is not None
    if pruning and density is None:
        raise MethodConfigError(f"merge: combination '{combination}' prunes; give density in (0, 1]")
    if density is not None:
        if not pruning:
            raise MethodConfigError(f"merge: combination '{combination}' does not prune; density {density!r} "
                                    "is for ties, dare_*, magnitude_prune (and their _svd variants)")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise MethodConfigError(f"merge: density {density!r} is outside (0, 1] (the fraction of values kept)")
    if majority_sign_method not in SIGN_METHODS:
        raise MethodConfigError(f"merge: majority_sign_method {majority_sign_method!r}; "
                                f"allowed: {allowed(SIGN_METHODS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MethodConfigError(f"merge: rank {rank!r} is not a whole number >= 1")
    if combination not in SVD_BASED and (svd_clamp is not None or svd_driver is not None):
        raise MethodConfigError(f"merge: svd_clamp / svd_driver are for the svd-based combinations, "
                                f"not '{combination}'")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        raise MethodConfigError(f"merge: svd_clamp {svd_clamp!r} is not a quantile in [0, 1]")
    if svd_driver not in SVD_DRIVERS:
        raise MethodConfigError(f"merge: svd_driver {svd_driver!r}; allowed: {allowed(SVD_DRIVERS)}")


def _check_tensor(tensor, what: str, where: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise AttachError(f"{where}: {what} is {shape}; a 2-D float tensor is needed")
    if not bool(torch.isfinite(tensor).all()):
        raise AttachError(f"{where}: {what} has NaN or inf values")


def _check_entries(present, combination: str, module: str) -> tuple[int, int]:
    """Every entry well formed and of one shape, dtype and device; returns (out, in)."""
    first = None
    for name, entry, _ in present:
        where = f"merge at module '{module}': adapter '{name}'"
        if isinstance(entry, LoraFactors):
            _check_tensor(entry.a, "lora A", where)
            _check_tensor(entry.b, "lora B", where)
            if entry.b.shape[1] != entry.a.shape[0]:
                raise AttachError(f"{where}: lora B {tuple(entry.b.shape)} and lora A {tuple(entry.a.shape)} "
                                  "disagree on the rank")
            if entry.b.dtype != entry.a.dtype or entry.b.device != entry.a.device:
                raise AttachError(f"{where}: lora A and B differ in dtype or device")
            scale = entry.scale
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise AttachError(f"{where}: scale {scale!r} is not a finite number")
            shape, probe = (int(entry.b.shape[0]), int(entry.a.shape[1])), entry.a
        elif isinstance(entry, torch.Tensor):
            _check_tensor(entry, "ΔW", where)
            if combination not in SVD_BASED:
                raise AttachError(f"{where}: a dense ΔW, not LoRA factors; '{combination}' combines LoRA factors "
                                  f"(use an svd-based combination, or to_lora_factors first)")
            shape, probe = (int(entry.shape[0]), int(entry.shape[1])), entry
        else:
            raise AttachError(f"{where}: {type(entry).__name__}; give LoraFactors, a ΔW tensor or None")
        if first is None:
            first = (name, shape, probe.dtype, probe.device)
            continue
        if shape != first[1]:
            raise AttachError(f"{where}: ΔW is [out, in] = {list(shape)}, adapter '{first[0]}' has "
                              f"{list(first[1])}")
        if probe.dtype != first[2] or probe.device != first[3]:
            raise AttachError(f"{where}: {probe.dtype} on {probe.device}, adapter '{first[0]}' is {first[2]} on "
                              f"{first[3]}")
    return first[1]


def _prune(tensor: torch.Tensor, how: str | None, density: float, generator) -> torch.Tensor:
    if how is None or density >= 1:
        return tensor
    if how == "magnitude":
        keep = torch.zeros_like(tensor).reshape(-1)
        keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
        return tensor * keep.reshape(tensor.shape)
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return kept / density


def _combine(tensors, weights: torch.Tensor, base: str, density, sign_method: str, generator) -> torch.Tensor:
    """One tensor from several of one shape: prune each, weight, sum (or TIES's sign-elected mean)."""
    stacked = torch.stack([_prune(t, _PRUNE[base], density, generator) for t in tensors], dim=0)
    weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.dim() - 1))
    if base not in _ELECTS:
        return weighted.sum(dim=0)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agrees = signs == torch.where(votes >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def _weights(values: Sequence[float], device) -> torch.Tensor:
    # float32 whatever the adapters' dtype, as PEFT's torch.tensor(list): it decides the dtype the sums run in
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = rank - a.shape[0]
    if missing <= 0:
        return a, b
    return (torch.cat([a, a.new_zeros(missing, a.shape[1])], dim=0),
            torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1))


def _truncated_svd(delta, rank, clamp, full_matrices, driver) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (Vh_k, U_k·diag(S_k)) of delta, clamped as PEFT's svd path; zero-padded above min(out, in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    kept = min(rank, s.shape[0])
    # row-major copies: LAPACK's U and Vh are column-major, and Vh is in × in with full_matrices
    b = (u[:, :kept] * s[:kept]).contiguous()
    a = vh[:kept, :].contiguous()
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return _pad(a, b, rank)


def merge_plan(combination: str, ranks: Sequence[int], svd_rank: int | None = None) -> tuple[str, int]:
    """PEFT's model-level choice for add_weighted_adapter: (the combination it runs, the new adapter's rank).

    `ranks`: each merged adapter's rank (its config r; the largest of r and its rank_pattern). One adapter runs
    `linear`; linear, ties, dare_*, magnitude_prune need one rank (the new rank); cat sums them; the svd-based use
    `svd_rank`, by default the largest."""
    if not isinstance(combination, str) or combination not in COMBINATIONS:
        raise MethodConfigError(f"merge: unknown combination {combination!r}; allowed: {allowed(COMBINATIONS)}")
    if not ranks:
        raise MethodConfigError("merge: no adapters to combine")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise MethodConfigError(f"merge: svd_rank {svd_rank!r} is not a whole number >= 1")
    for index, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MethodConfigError(f"merge: rank {rank!r} of adapter {index} is not a whole number >= 1")
    combination = "linear" if len(ranks) == 1 else combination
    if combination in FACTORWISE:
        if len(set(ranks)) != 1:
            raise AttachError(f"merge: combination '{combination}' needs adapters of one rank, got ranks "
                              f"{list(ranks)} (cat and the svd-based combinations take any ranks)")
        return combination, ranks[0]
    if combination == "cat":
        return combination, sum(ranks)
    return combination, svd_rank or max(ranks)


def merge_module(entries: Mapping[str, Entry], weights: Sequence[float], combination: str, *,
                 rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
                 svd_clamp: float | None = None, svd_full_matrices: bool = True, svd_driver: str | None = None,
                 fan_in_fan_out: bool = False, generator: torch.Generator | None = None,
                 module: str = "module") -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A [rank, in], B [out, rank]) at one module, of scale 1, as PEFT's add_weighted_adapter.

    `entries`: adapter name -> LoraFactors, dense ΔW or None, in the merge's order; `weights`: one per entry.
    `rank`: the new rank (merge_plan gives PEFT's model-level one); by default this module's: the common r
    (factor-wise), Σ r_i (cat), the largest r_i (svd-based; required when every entry is a dense ΔW); ignored
    for a single LoRA entry, merged linearly at its own rank as PEFT does.
    `fan_in_fan_out`: the base weight is stored [in, out] (GPT-2's Conv1D, an embedding): PEFT's svd path prunes
    and draws DARE's masks on ΔWᵀ, and so does this. `generator`: DARE's masks (module docstring). `module`: the
    name errors give. Bad options raise MethodConfigError, incompatible entries AttachError, in one line."""
    if not isinstance(entries, Mapping):
        raise MethodConfigError(f"merge at module '{module}': entries is a {type(entries).__name__}; give a dict "
                                "adapter name -> LoraFactors, ΔW or None")
    _check_options(combination, len(entries), weights, density, majority_sign_method, rank, svd_clamp, svd_driver)
    present = [(name, entry, float(w)) for (name, entry), w in zip(entries.items(), weights) if entry is not None]
    if not present:
        raise AttachError(f"merge at module '{module}': none of the adapters {list(entries)} has this module")
    if len(entries) == 1 and isinstance(present[0][1], LoraFactors):
        combination, rank = "linear", None  # PEFT merges a single adapter linearly at its rank, whatever was asked
    _check_entries(present, combination, module)
    dtype, device = _probe(present[0][1]).dtype, _probe(present[0][1]).device
    if svd_driver is not None and device.type != "cuda":
        raise MethodConfigError(f"merge: svd_driver {svd_driver!r} needs CUDA tensors; module '{module}' is on "
                                f"{device}")
    factors = [entry for _, entry, _ in present if isinstance(entry, LoraFactors)]
    if combination in FACTORWISE:
        ranks = {f.rank for f in factors}
        if len(ranks) != 1 or (rank is not None and rank not in ranks):
            listed = ", ".join(f"'{n}': {e.rank}" for n, e, _ in present)
            raise AttachError(f"merge at module '{module}': combination '{combination}' needs one rank"
                              f"{'' if rank is None else f' ({rank})'}, got {listed}")
        signed, plain = [], []
        for _, entry, weight in present:
            product = weight * entry.scale
            signed.append(math.sqrt(abs(product)) * (1 if product >= 0 else -1))
            plain.append(math.sqrt(abs(product)))
        base = _base(combination)
        a = _combine([f.a for f in factors], _weights(signed, device), base, density, majority_sign_method,
                     generator)
        b = _combine([f.b for f in factors], _weights(plain, device), base, density, majority_sign_method,
                     generator)
        return a.to(dtype), b.to(dtype)
    if combination == "cat":
        total = sum(f.rank for f in factors)
        if rank is not None and rank < total:
            raise AttachError(f"merge at module '{module}': cat gives rank {total} (the sum of the adapters' "
                              f"ranks here), above the requested rank {rank}")
        a = torch.cat([(entry.a * weight) * entry.scale for _, entry, weight in present], dim=0)
        b = torch.cat([entry.b for _, entry, _ in present], dim=1)
        return _pad(a, b, rank or total)
    if rank is None:
        if not factors:
            raise MethodConfigError(f"merge at module '{module}': every adapter here is a dense ΔW; give rank")
        rank = max(f.rank for f in factors)
    deltas = [entry.delta() if isinstance(entry, LoraFactors) else entry for _, entry, _ in present]
    if fan_in_fan_out:
        deltas = [d.T for d in deltas]
    combined = _combine(deltas, _weights([w for _, _, w in present], device), _base(combination), density,
                        majority_sign_method, generator)
    if fan_in_fan_out:
        combined = combined.T
    a, b = _truncated_svd(combined, rank, svd_clamp, svd_full_matrices, svd_driver)
    return a.to(dtype), b.to(dtype)


def _probe(entry) -> torch.Tensor:
    return entry.a if isinstance(entry, LoraFactors) else entry


def to_lora_factors(delta_w: torch.Tensor, rank: int, *, module: str = "module"
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A dense ΔW [out, in] as LoRA factors of scale 1: (A [rank, in], B [out, rank], relative error).

    Truncated SVD as PEFT's convert_to_lora (B = U_k·diag(S_k), A = the first k rows of Vh, reduced SVD; float16
    / bfloat16 in float32, the factors rounded back to ΔW's dtype): exact up to rounding when rank >= rank(ΔW); a
    rank above min(out, in) is zero-padded. The relative error is ||ΔW − B·A||_F / ||ΔW||_F, measured in float64
    on the returned factors (so it includes their rounding to ΔW's dtype), 0.0 when ΔW is 0."""
    where = f"to_lora at module '{module}'"
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MethodConfigError(f"{where}: rank {rank!r} is not a whole number >= 1")
    _check_tensor(delta_w, "ΔW", where)
    work = delta_w.float() if delta_w.dtype in (torch.float16, torch.bfloat16) else delta_w
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    kept = min(rank, s.shape[0])
    a, b = _pad(vh[:kept].to(delta_w.dtype), (u[:, :kept] * s[:kept]).to(delta_w.dtype), rank)
    a, b = a.contiguous(), b.contiguous()
    reference = delta_w.double()
    norm = float(torch.linalg.matrix_norm(reference))
    if norm == 0.0:
        return a, b, 0.0
    return a, b, float(torch.linalg.matrix_norm(reference - b.double() @ a.double())) / norm


def combine_ia3(vectors: Mapping[str, torch.Tensor | None], weights: Sequence[float], *,
                module: str = "module") -> torch.Tensor:
    """(IA)³'s merge in PEFT (IA3Model.add_weighted_adapter): Σ w_i·l_i of the scaling vectors present here.

    This combines the vectors l, not the ΔW = (l − 1)⊙W (the two agree when the weights sum to 1)."""
    _check_options("linear", len(vectors), weights, None, "total", None, None, None)
    present = [(name, v, float(w)) for (name, v), w in zip(vectors.items(), weights) if v is not None]
    if not present:
        raise AttachError(f"merge at module '{module}': none of the adapters {list(vectors)} has this module")
    first_name, first = present[0][0], present[0][1]
    for name, vector, _ in present:
        where = f"merge at module '{module}': adapter '{name}'"
        if not isinstance(vector, torch.Tensor) or not vector.is_floating_point():
            raise AttachError(f"{where}: {type(vector).__name__}; an (IA)³ vector is a float tensor")
        if vector.shape != first.shape or vector.dtype != first.dtype or vector.device != first.device:
            raise AttachError(f"{where}: {tuple(vector.shape)} {vector.dtype}, adapter '{first_name}' has "
                              f"{tuple(first.shape)} {first.dtype}")
        if not bool(torch.isfinite(vector).all()):
            raise AttachError(f"{where}: the (IA)³ vector has NaN or inf values")
    total = torch.zeros_like(first)
    for _, vector, weight in present:
        total += vector * weight
    return total
