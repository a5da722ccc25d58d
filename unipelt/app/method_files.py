"""`unipelt-train method=<file.yaml>`: a method file anywhere on disk as the method group's choice.

Hydra looks group options up in its search path only, so the file is validated (unipelt.load_method), stored in
the ConfigStore under a name derived from its resolved path, and the override is rewritten to that name before
Hydra parses the command line. The file is used as it is: its content is the composed `method` node.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..errors import UnipeltError, read_utf8
from ..spec import load_method
from ..spec_values import load_yaml

SUFFIXES = (".yaml", ".yml")


def _stored_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"file_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"


def method_files(argv: list[str]) -> list[str]:
    """argv with each `method=<file.yaml>` replaced by a stored option; a bad file stops with one line."""
    out = []
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("method=") else ""
        if not value.endswith(SUFFIXES) or "," in value:
            out.append(arg)
            continue
        path = Path(value).expanduser().resolve()
        try:
            if not path.is_file():
                raise UnipeltError(f"method file not found: {value}")
            load_method(path)  # the grammar's checks, before anything is composed
            raw = dict(load_yaml(read_utf8(path, UnipeltError, "method file")))
        except UnipeltError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raw.setdefault("name", path.stem)
        name = _stored_name(path)
        ConfigStore.instance().store(group="method", name=name, node=OmegaConf.create(raw), provider="unipelt")
        out.append(f"method={name}")
    return out


__all__ = ["method_files"]
