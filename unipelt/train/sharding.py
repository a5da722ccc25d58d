"""Sharded data parallelism (`trainer.strategy: fsdp`): PyTorch FSDP2 (`fully_shard`) for models whose frozen base
does not fit one device. Everything distributed is torch's: the sharding, the collectives, the state dicts
(torch.distributed.checkpoint); this module only decides what to shard and reads the model through it.

- Units: every transformer layer of every stack in the site table (unipelt/sites/table.py) is one FSDP unit,
  then the root takes the rest (embeddings, head, a prefix's reparameterisation MLP, prompt vectors). Frozen base
  weights and trainable adapters share a unit (mixed requires_grad): both are sharded, only the adapters get
  gradients, which FSDP reduce-scatters (averaged, as DDP does).
- Mixed precision: `precision: bf16` gathers parameters and computes in bf16 and reduces gradients in float32;
  the trainable parameters are held (sharded) in float32, so the optimizer updates float32 masters. fp32 (CPU
  and the default) shards the parameters as they are.
- 4-bit bases (QLoRA): each NF4 weight's packed bytes are re-viewed as the float dtype FSDP gathers in
  (bitsandbytes' `quant_storage`), so a 4-bit layer shards and gathers like any other weight; bitsandbytes
  restores the quantization state from the layer after each gather.
- Reading state: trainable parameters as full tensors (torch.distributed.checkpoint.state_dict with
  full_state_dict), e.g. for save_adapter, which then writes the very files a single process writes;
  resumable checkpoints are torch.distributed.checkpoint directories, each rank writing its own shards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UnipeltError
from ..placement import base_path
from ..quantize import is_4bit
from ..sites import family_of
from .distributed import Dist

SHARDED_CHECKPOINT = "last_sharded"  # a torch.distributed.checkpoint directory under checkpoints/
TRAINER_STATE = "trainer_state.pt"  # the loop's bookkeeping inside it (scheduler, every rank's RNG, history)
BEST_STATE = "best_state_rank{rank}.pt"  # each rank's shards of the best trainable state
LIFTED_SCALARS = "_unipelt_lifted_scalars"  # on the model: names of 0-dim parameters held as [1] while sharded


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every layer of every stack the site table names for this model family (the FSDP units)."""
    try:
        family = family_of(model.config)
    except UnipeltError as exc:
        raise UnipeltError(f"trainer.strategy 'fsdp': {exc}") from None
    base = model.get_submodule(base_path(model))
    blocks: list[nn.Module] = []
    for stack in family.stacks.values():
        blocks.extend(base.get_submodule(stack.path))
    return blocks


def holds_4bit(model: nn.Module) -> bool:
    """Whether the base has 4-bit layers (moved to the device whole before sharding: FSDP's own move would leave
    bitsandbytes' quantization state behind)."""
    return any(is_4bit(m) for m in model.modules())


def check_4bit(model: nn.Module, storage: torch.dtype) -> None:
    """Refuse before sharding when a 4-bit layer cannot be stored as `storage` (one line saying what is needed)."""
    layers = [(name, m) for name, m in model.named_modules() if is_4bit(m)]
    if not layers:
        return
    import inspect

    import bitsandbytes as bnb

    if "quant_storage" not in inspect.signature(bnb.nn.Params4bit.__new__).parameters:
        raise UnipeltError(f"trainer.strategy 'fsdp' with a 4-bit base needs bitsandbytes with quant_storage "
                           f"(>= 0.43); installed: {bnb.__version__}")
    size = torch.empty((), dtype=storage).element_size()
    for name, module in layers:
        packed = module.weight.data.numel() * module.weight.data.element_size()
        if packed % size:
            raise UnipeltError(f"trainer.strategy 'fsdp': 4-bit layer '{name}' packs {packed} bytes, not a multiple "
                               f"of {size}; FSDP needs it stored as {storage}")


def store_4bit_as(model: nn.Module, storage: torch.dtype) -> None:
    """Re-view every NF4 weight's packed bytes as `storage` (no copy, no requantization): FSDP then shards and
    gathers it like a float weight of that dtype, and never casts it (it already has the gather dtype)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if not is_4bit(module) or module.weight.dtype == storage:
            continue
        old = module.weight
        packed = old.data.reshape(-1).view(torch.uint8).view(storage).reshape(-1, 1)
        module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=old.quant_state,
                                          blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                          quant_type=old.quant_type, quant_storage=storage, module=module,
                                          bnb_quantized=True)
        module.quant_storage = storage
        module.quant_state = old.quant_state


def check_optimizer(name: str | None) -> None:
    """bitsandbytes' optimizers (QLoRA's paged 8-bit AdamW) run custom kernels that have no rule for FSDP2's
    sharded DTensor parameters: refused before anything is sharded, with what works instead."""
    from .optimizers import BNB_OPTIMIZERS

    if BNB_OPTIMIZERS.get(name or "adamw") is not None:
        raise UnipeltError(f"trainer.strategy 'fsdp': method.optimizer '{name}' (bitsandbytes) cannot update "
                           "FSDP2's sharded (DTensor) parameters; use method.optimizer=adamw, or strategy=ddp")


def lift_scalars(model: nn.Module) -> None:
    """fully_shard splits parameters along dim 0 and refuses 0-dim ones: a learned scalar (compose: scale, scale:
    learned) becomes a 1-element vector for training (its products broadcast exactly alike); save_adapter writes
    it back as the scalar a single process saves."""
    lifted = []
    for name, param in model.named_parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)
            lifted.append(name)
    model.__dict__[LIFTED_SCALARS] = lifted


def gather_dtype(precision: str) -> torch.dtype | None:
    """The dtype FSDP gathers parameters in and computes with: bf16 under `precision: bf16`, else as they are."""
    return torch.bfloat16 if precision == "bf16" else None


def shard(model: nn.Module, info: Dist, precision: str) -> None:
    """fully_shard each transformer layer, then the root, over all processes (in place). Call it before the
    optimizer is built: sharding replaces every parameter by its DTensor shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute = gather_dtype(precision)
    # float32 reduction of the adapters' gradients and float32 masters for the optimizer
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    if compute is not None:
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    lift_scalars(model)
    storage = compute or next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    check_4bit(model, storage)
    store_4bit_as(model, storage)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient accumulation: no reduce-scatter on the micro-batches before the last of a step (FSDP2's no_sync)."""
    if enabled:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Every rank evaluates (a sharded forward needs all of them). The root's own parameters (embeddings, head,
    prompt vectors) stay gathered throughout, because generate() calls the encoder and the head outside the root's
    forward; the layers gather and free themselves as in training."""
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def local_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shard of every trainable parameter, copied to CPU (the best state kept during training: 1/N of
    the trainable parameters per rank, whatever trains, an adapter or a whole model)."""
    return {name: p.detach().to_local().to("cpu", copy=True) for name, p in model.named_parameters()
            if p.requires_grad}


@torch.no_grad()
def load_local_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put shards from local_trainable_state back (same processes, same sharding)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        culprit = sorted(set(state) ^ set(params))[0]
        raise UnipeltError(f"state does not match the sharded model's trainable parameters (e.g. '{culprit}')")
    for name, shard_copy in state.items():
        local = params[name].to_local()
        if local.shape != shard_copy.shape:
            raise UnipeltError(f"state of '{name}' has shard shape {tuple(shard_copy.shape)}, this rank holds "
                               f"{tuple(local.shape)} (another number of processes?)")
        local.copy_(shard_copy)


@contextlib.contextmanager
def full_parameters(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the named (trainable) parameters are the given full tensors instead of their shards, so
    code that reads a module's parameters (save_adapter: a prefix folded through its MLP, AdaLoRA's kept triplets)
    sees the whole adapter. The sharded parameters are put back exactly; no forward may run inside."""
    swapped = []
    try:
        for name, tensor in state.items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            swapped.append((module, leaf, module._parameters[leaf]))
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        yield
    finally:
        for module, leaf, original in reversed(swapped):
            module._parameters[leaf] = original


def save_adapter_with(model: nn.Module, info: Dist, save: Callable[..., Any], *args: Any) -> Any:
    """Gather the trainable parameters to rank 0 (collective: call it on every rank), then run `save(model, *args)`
    there with the full tensors in place; returns its result on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    result = None
    if info.is_main:
        lifted = set(model.__dict__.get(LIFTED_SCALARS, ()))
        whole = {name: full[name].reshape(()) if name in lifted else full[name] for name in trainable_names(model)}
        with full_parameters(model, whole):
            result = save(model, *args)
    dist.barrier()
    return result


def save_adapter(model: nn.Module, directory: str | os.PathLike, info: Dist) -> Path | None:
    """unipelt.save_adapter for a sharded model: rank 0 writes the very files a single process would write."""
    from ..io import save_adapter as save_plain

    return save_adapter_with(model, info, save_plain, directory)


# ---- resumable checkpoints (torch.distributed.checkpoint) ---------------------------------------------------------

def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    return {"model": model_state, "optim": optim_state}


def save_checkpoint(output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], info: Dist) -> Path:
    """Every rank writes its shards of the trainable parameters and optimizer state into a fresh directory; rank 0
    adds the bookkeeping (with every rank's RNG state) and swaps the directory in, so a kill at any moment leaves
    the previous complete checkpoint."""
    import torch.distributed.checkpoint as dcp

    from .seeding import rng_state

    folder = Path(output_dir) / "checkpoints"
    final, tmp, old = (folder / SHARDED_CHECKPOINT, folder / f".{SHARDED_CHECKPOINT}.tmp",
                       folder / f".{SHARDED_CHECKPOINT}.old")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp))
    rngs: list[Any] = [None] * info.world_size
    dist.all_gather_object(rngs, rng_state())
    trainer_state = dict(trainer_state)
    # the best state is this rank's shards (local_trainable_state): one file per rank
    torch.save(trainer_state.pop("best_state"), tmp / BEST_STATE.format(rank=info.rank))
    dist.barrier()
    if info.is_main:
        torch.save({**trainer_state, "rng_per_rank": rngs}, tmp / TRAINER_STATE)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def find_checkpoint(output_dir: Path) -> Path | None:
    """The last complete sharded checkpoint (or the previous one when a kill fell between its two renames)."""
    folder = Path(output_dir) / "checkpoints"
    for candidate in (folder / SHARDED_CHECKPOINT, folder / f".{SHARDED_CHECKPOINT}.old"):
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    return None


def checkpoint_finder(sharded: bool) -> Callable[[Path], Path | None]:
    """This run's kind of checkpoint (sharded, or the whole-model last.pt); the other kind in the folder is refused in
    one line, never silently ignored."""
    from . import checkpoint as ckpt

    mine, other = (find_checkpoint, ckpt.find_checkpoint) if sharded else (ckpt.find_checkpoint, find_checkpoint)

    def find(output_dir: Path) -> Path | None:
        found, foreign = mine(output_dir), other(output_dir)
        if found is None and foreign is not None:
            written = "ddp or one process" if sharded else "fsdp with several processes"
            raise UnipeltError(f"checkpoint {foreign} was written with trainer.strategy {written}; resume it the "
                               "same way (strategy and number of processes), or give this run another folder")
        return found

    return find


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: Dist) -> dict[str, Any]:
    """Load the shards into the model and optimizer; returns the bookkeeping with this rank's RNG state as `rng`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    try:
        # weights_only=False: RNG states (NumPy arrays, tuples) that this run itself wrote
        saved = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UnipeltError(f"cannot read checkpoint {path / TRAINER_STATE} ({type(exc).__name__}: {exc})") from None
    rngs = saved.pop("rng_per_rank")
    if len(rngs) != info.world_size:
        raise UnipeltError(f"checkpoint {path} was written by {len(rngs)} processes; this run has "
                           f"{info.world_size} (resume with the same number)")
    best = torch.load(path / BEST_STATE.format(rank=info.rank), map_location="cpu", weights_only=True)
    state = _sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnipeltError(f"cannot load sharded checkpoint {path} ({type(exc).__name__}: {first[:300]}); was it "
                           "written with another method or model?") from None
    # strict=False: the frozen base is not in the checkpoint (dcp.load already refused a missing trainable key)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))
    return {**saved, "rng": rngs[info.rank], "best_state": best}


__all__ = ["checkpoint_finder", "evaluating", "find_checkpoint", "gradient_sync", "is_sharded", "load_checkpoint",
           "load_local_trainable_state", "local_trainable_state", "save_adapter", "save_adapter_with",
           "save_checkpoint", "shard", "transformer_blocks"]
