"""One run per folder: an exclusive lock while a run (or a sweep) writes into a folder, and the settings a resumed
run must share with its checkpoint.

The lock is an flock on `<folder>/.unipelt.lock`, which the kernel drops when the process dies (kill -9 included),
so a crashed run never blocks its own resume. Within one process the lock is re-entrant (the Hydra app takes it
before Hydra writes into the folder, then the trainer takes it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import signal
import socket
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..errors import UnipeltError
from ..io import config_hash
from ..optim import method_of
from . import checkpoint as ckpt

LOCK_NAME = ".unipelt.lock"
# TrainConfig keys that do not change what a run computes: a resumed run may change them.
RESUMABLE_KEYS = frozenset({"resume", "progress", "log_every", "num_workers", "device", "eval_batch_size",
                            "checkpoint_every", "checkpoint_minutes", "save_best"})

_held: dict[str, list[Any]] = {}  # real folder path -> [open lock file, reference count]


class FolderInUse(UnipeltError):
    """Another process is writing into this run folder."""


def lock_folder(folder: str | os.PathLike, what: str = "run") -> str:
    """Take the folder's lock (creating the folder) or raise FolderInUse naming who holds it; returns its key."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        return key
    handle = open(Path(key) / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUse(f"{what} folder {path} is in use by {holder}; give each {what} its own folder "
                          f"(hydra.run.dir / hydra.sweep.dir) or wait for it to finish") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
    handle.flush()
    _held[key] = [handle, 1]
    return key


def unlock_folder(key: str) -> None:
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        fcntl.flock(entry[0], fcntl.LOCK_UN)
        entry[0].close()
        del _held[key]


def result_settings(cfg: Any) -> dict[str, Any]:
    """The trainer settings that change a run's result, as `trainer.<key>` (a TrainConfig)."""
    return {f"trainer.{k}": v for k, v in asdict(cfg).items() if k not in RESUMABLE_KEYS}


def data_fingerprint(rows: Iterable[Any]) -> str:
    """A digest of tokenized examples: a resumed run must train on the same data, not only the same file name."""
    h = hashlib.blake2b(digest_size=12)
    for row in rows:
        h.update(repr(sorted(row.items()) if isinstance(row, dict) else row).encode())
    return h.hexdigest()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first key (sorted) whose value differs between two flat settings dicts, or None."""
    missing = object()
    for key in sorted(set(saved) | set(current)):
        if not _same(saved.get(key, missing), current.get(key, missing)):
            return key
    return None


def refuse_changed_settings(saved: dict[str, Any], current: dict[str, Any], source: str) -> None:
    """One line naming the first result-changing setting a resumed run would change."""
    key = first_difference(saved, current)
    if key is not None:
        def shown(value: Any) -> str:
            return "(not set)" if value is None and key not in saved else repr(value)

        raise UnipeltError(f"trainer.resume: {key} was {shown(saved.get(key))} in {source} but is "
                           f"{shown(current.get(key))} now; a resumed run keeps every setting that changes its "
                           "result (start a new run folder to change it)")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': leaf, 'a.list.0.c': leaf} for nested mappings and lists of mappings."""
    if isinstance(tree, dict) or (isinstance(tree, (list, tuple)) and any(isinstance(v, dict) for v in tree)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        out: dict[str, Any] = {}
        for key, value in items:
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def run_settings(model: torch.nn.Module, task: Any, cfg: Any, seed: int, extra: dict[str, Any] | None
              ) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: trainer settings that change the result, the method, the
    base architecture, the seed, the tokenized data (not only its file name) and the caller's own settings."""
    def rows(data: Any) -> Any:
        return getattr(data, "features", None) or (data[i] for i in range(len(data)))

    found = {**result_settings(cfg), "seed": seed, "model.config_hash": config_hash(model.config),
             **flatten({"method": method_of(model).to_dict()}),
             "data.train": data_fingerprint(rows(task.train))}
    for split, data in task.eval_splits.items():
        found[f"data.{split}"] = data_fingerprint(rows(data))
    return {**found, **(extra or {})}


def check_folder(cfg: Any, output_dir: Path, find: Callable[[Path], Path | None] = ckpt.find_checkpoint,
                 name: str = ckpt.LAST) -> Path | None:
    """The checkpoint to resume from; refuses a resume with nothing to resume and a fresh run over another's files.
    `find` and `name`: the run's kind of checkpoint (a sharded run's is a torch.distributed.checkpoint directory)."""
    found = find(output_dir)
    if cfg.resume and found is None:
        raise UnipeltError(f"trainer.resume=true but {output_dir / ckpt.CHECKPOINT_DIR / name} does not exist; "
                           "set trainer.resume=false to start afresh")
    if not cfg.resume and found is not None:
        raise UnipeltError(f"{output_dir} already holds a run's checkpoint ({found.relative_to(output_dir)}); continue "
                           "it with trainer.resume=true, or give this run another folder")
    return found


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's pre-emption, `kill`) ends the run like Ctrl-C: with a checkpoint and one line."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["FolderInUse", "LOCK_NAME", "RESUMABLE_KEYS", "check_folder", "data_fingerprint", "first_difference",
           "flatten", "lock_folder", "refuse_changed_settings", "result_settings", "run_settings",
           "sigterm_as_interrupt", "unlock_folder"]
