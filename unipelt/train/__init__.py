"""unipelt.train: a training loop for any attached method on any prepared task (imports the core and
unipelt.tasks, never the app)."""

from .checkpoint import BEST_ADAPTER, CHECKPOINT_DIR
from .config import TrainConfig
from .distributed import Dist
from .loop import TrainingDiverged, TrainingInterrupted, TrainResult, fit
from .seeding import set_seed

__all__ = ["BEST_ADAPTER", "CHECKPOINT_DIR", "Dist", "TrainConfig", "TrainResult", "TrainingDiverged",
           "TrainingInterrupted", "fit", "set_seed"]
