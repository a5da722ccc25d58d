"""design_search's result: the best configuration of a sweep written out as a method file.

`BestMethodWriter` is a Hydra callback (experiments/design_search.yaml adds it to hydra.callbacks). When a sweep
ends it reads the sweep's results file, takes the completed run with the best score (the task's direction), and
writes `best_method.yaml` into the sweep folder: the method that run trained, sizes solved for the model it ran on
(no budget left to solve), with the score, the run and its overrides in a header. `unipelt-train
method=<sweep>/best_method.yaml` trains it unchanged; on another model, add `method.budget=...` to re-solve sizes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..errors import UnipeltError
from ..io import atomic_write
from ..spec import load_method
from .results import read_records

log = logging.getLogger("unipelt.design_search")
BEST_NAME = "best_method.yaml"


def best_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The completed run with the best finite score; each run's direction is its task's (greater_is_better)."""
    done = [r for r in records if r.get("status") == "completed" and isinstance(r.get("score"), (int, float))
            and math.isfinite(r["score"]) and isinstance(r.get("method_spec"), dict)]
    if not done:
        raise UnipeltError("design_search: no completed run with a score to pick the best method from")
    if len({bool(r.get("greater_is_better", True)) for r in done}) > 1:
        raise UnipeltError("design_search: the runs disagree on whether a greater score is better")
    sign = 1.0 if done[0].get("greater_is_better", True) else -1.0
    return max(done, key=lambda r: sign * float(r["score"]))


def write_best_method(records: list[dict[str, Any]], path: Path) -> Path:
    best = best_record(records)
    spec = load_method(best["method_spec"])  # what the run trained, checked again before it is written
    overrides = " ".join(o for o in best.get("overrides") or [] if not str(o).startswith("hydra"))
    header = [f"# design_search: best of {sum(r.get('status') == 'completed' for r in records)} completed runs",
              f"# {best.get('main_metric')} = {best['score']:.4f} (seed {best.get('seed')}, "
              f"{(best.get('params') or {}).get('percent', math.nan):.3f}% added parameters)",
              f"# run: {best.get('output_dir')}", f"# overrides: {overrides}",
              f"# trained with trainer.lr={best.get('lr')} (a method file holds no trainer settings)",
              "# sizes are solved for that run's model; on another model add method.budget=... to re-solve them"]
    text = "\n".join(header) + "\n" + yaml.safe_dump(spec.to_dict(), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


class BestMethodWriter(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        results = Path(str(config.results_file))
        results = results if results.is_absolute() else sweep_dir / results
        try:
            path = write_best_method(read_records([results]) if results.exists() else [], sweep_dir / BEST_NAME)
        except UnipeltError as exc:
            log.error(str(exc))
            return
        log.info(f"best method written to {path} (unipelt-train method={path})")


__all__ = ["BestMethodWriter", "best_record", "write_best_method", "BEST_NAME"]
