"""Where the data folders that ship with unipelt are: conf/ (Hydra's config dir: the method presets, models, tasks)
and experiments/ (the `+experiment=<name>` files).

They are found next to the imported package, never through the import system: an editable install maps the
packages `unipelt.conf` / `unipelt.experiments` to one checkout, so a copy of the tree on PYTHONPATH would read
that checkout's presets instead of its own. Two layouts, tried in this order:

- installed (a wheel, `pip install .`): `<site-packages>/unipelt/conf`, pyproject.toml's package-dir mapping;
- source tree (a checkout, an editable install, a copy on PYTHONPATH): `<checkout>/unipelt/../conf`.

The installed place is tried first because a source tree never has `unipelt/conf`, while beside an installed
package (in site-packages) a folder named `conf` may well belong to another distribution.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UnipeltError

# Not resolved: a package reached through a symlink reads the data beside the link, where it was imported from.
PACKAGE_DIR = Path(os.path.abspath(__file__)).parent


def _data_dir(name: str) -> Path:
    installed = PACKAGE_DIR / name
    source_tree = PACKAGE_DIR.parent / name
    for place in (installed, source_tree):
        if place.is_dir():
            return place
    raise UnipeltError(f"unipelt's {name}/ folder is missing: looked in {installed} (installed package) and "
                       f"{source_tree} (source tree); reinstall unipelt or restore {name}/ in the checkout")


def conf_dir() -> Path:
    """conf/: conf_dir() / "method" holds the presets, "model" and "task" the model and task entries."""
    return _data_dir("conf")


def experiments_dir() -> Path:
    """experiments/: the files `unipelt-train +experiment=<name>` reads."""
    return _data_dir("experiments")


__all__ = ["PACKAGE_DIR", "conf_dir", "experiments_dir"]
