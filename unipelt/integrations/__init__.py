"""unipelt in other training stacks (imports transformers' Trainer; nothing in unipelt imports this package).

- `UnipeltCallback`: drives an attached method's training contract (unipelt.optim) from transformers' Trainer or
  any subclass of it (TRL's SFTTrainer ...), and carries the method's training state through its checkpoints.
- `UnipeltTrainer`, `unipelt_trainer(cls)`, `UnipeltTrainerMixin`: the Trainer (or `cls`) with that callback,
  unipelt's parameter groups, adapter-only checkpoints and `save_model`, and resume from them.

See the README, "With the Hugging Face Trainer / TRL".
"""

from .hf_callback import UnipeltCallback
from .hf_trainer import PEFT_DIR, UnipeltTrainer, UnipeltTrainerMixin, unipelt_trainer
from .resume_files import RESUME_FILE

__all__ = ["PEFT_DIR", "RESUME_FILE", "UnipeltCallback", "UnipeltTrainer", "UnipeltTrainerMixin", "unipelt_trainer"]
