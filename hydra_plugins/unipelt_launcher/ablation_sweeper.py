"""hydra/sweeper=ablation: Hydra's grid sweep, with every cell checked by the method grammar before any job runs.

Each job's config is composed as the job will see it, its method built from the axes (unipelt/app/ablation.py)
and validated by unipelt.load_method, and, where the method has a budget and the model's config can be read, the
budget solved on the meta device. A cell the grammar or the budget refuses is not launched: it is listed in the
log and written to the sweep's results file as a `skipped` record with the reason (unipelt-report lists it). A
cell that builds the same method with the same settings as an earlier one (e.g. compose=add with any scale) is
skipped as a duplicate. The remaining jobs go to the configured launcher unchanged (basic, gpus, slurm...).
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module outside sys.modules, where
# dataclasses would look string annotations up.
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from unipelt.errors import UnipeltError, one_line
from unipelt.app import folders
from unipelt.app.ablation import axes_set, cell_key, cell_name, with_axes
from unipelt.app.results import append_record

log = logging.getLogger("unipelt.ablation")


@dataclass
class AblationSweeperConf:
    _target_: str = "hydra_plugins.unipelt_launcher.ablation_sweeper.AblationSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="ablation", node=AblationSweeperConf, provider="unipelt")


def _check_budget(cfg: DictConfig) -> None:
    """The budget solved for the model's config (meta device); unreadable configs (a hub id offline) are left to
    the job itself."""
    if cfg.method.get("budget") is None:
        return
    from transformers import AutoConfig

    from unipelt.budget import solve_budget

    try:
        model_config = AutoConfig.from_pretrained(str(cfg.model.name_or_path))
    except (OSError, ValueError):
        return
    if cfg.task.get("kind") == "classification":  # the head does not count, but the config must build
        model_config.num_labels = max(2, len(cfg.task.get("label_names") or []))
    solve_budget(cfg.method, model_config)


class AblationSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.seen: Dict[str, str] = {}
        self.skipped: List[Tuple[str, str]] = []

    def _cell(self, overrides: Sequence[str]) -> Optional[str]:
        """None when the job may run, else why it is skipped."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # hydra's own node needs a job number
        given = axes_set(cfg.get("axes"))
        name = cell_name(given, str(cfg.method.get("name", "custom")))
        try:
            built = with_axes(cfg.copy())
            _check_budget(built)
        except UnipeltError as exc:
            return self._record(cfg, overrides, name, one_line(f"{type(exc).__name__}: {exc}"))
        key = cell_key(built)
        if key in self.seen:
            return self._record(cfg, overrides, name, f"duplicate: builds the same method and settings as "
                                                      f"{self.seen[key]}")
        self.seen[key] = " ".join(o for o in overrides if not o.startswith("hydra"))
        return None

    def _record(self, cfg: DictConfig, overrides: Sequence[str], name: str, reason: str) -> str:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        results = Path(str(cfg.results_file))
        results = results if results.is_absolute() else sweep_dir / results
        config = folders.result_config(cfg)
        append_record(results, {"status": "skipped", "reason": reason, "method": name, "task": cfg.task.get("name"),
                                "seed": int(cfg.seed), "name": cfg.name, "overrides": list(overrides),
                                "config": config, "finished": datetime.now(timezone.utc).isoformat()})
        self.skipped.append((" ".join(overrides), reason))
        log.warning(f"skipped {' '.join(overrides)}: {reason}")
        return reason

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        batch = super().get_job_batch()
        kept = [overrides for overrides in batch if self._cell(overrides) is None]
        if self.is_done() and self.skipped:
            log.warning(f"ablation: {len(self.skipped)} cells skipped (listed in the results file)")
        return kept


__all__ = ["AblationSweeper", "AblationSweeperConf"]
