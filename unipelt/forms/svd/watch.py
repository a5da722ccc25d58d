"""Saying so when AdaLoRA is trained without its training contract, instead of training in silence as a fixed-rank
SVD adapter with no rank budget and no orthogonal regulariser (e.g. under a plain transformers Trainer).

Two signs, each warned once per svd module:

- the rank allocator is not driven: the gradients of a λ were cleared after a backward pass with no
  `unipelt.optim.on_optimizer_step` in between. A post-accumulate-grad hook on one λ counts backward passes; a
  check at the start of each training forward of its module (grad mode on; never while torch.compile traces) sees
  the cleared gradient. Gradient accumulation keeps the gradient between micro-batches, and a checkpointed layer is
  recomputed before its backward reaches λ, so neither warns. A loop that clears gradients to zeros
  (zero_grad(set_to_none=False)) or shards λ (FSDP replaces the parameter) is not seen.
- the regulariser is not driven: `on_optimizer_step` comes with no `unipelt.optim.regularization_loss` call since
  the step before (its weight γ > 0).

It also says so when the allocator masks before it has scored anything (a schedule too short for its run, or a
resume that dropped the training state): every triplet is then pruned.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

ADVICE = ("drive it from your loop (loss + unipelt.optim.regularization_loss(model) before backward; "
          "unipelt.optim.on_optimizer_step(model, step, total_steps) after optimizer.step() and before zero_grad()), "
          "or with a Hugging Face Trainer use unipelt.integrations.UnipeltTrainer or UnipeltCallback")


class DriveWatch:
    """Watches one svd module spec's allocator and regulariser (see the module docstring)."""

    def __init__(self, module_name: str, delta: nn.Module, regulariser: Any = None) -> None:
        self.module_name = module_name
        self.regulariser = regulariser
        self.backwards = 0  # backward passes that reached the watched λ since the last on_optimizer_step
        self.warned: set[str] = set()
        self.regulariser_calls = regulariser.calls if regulariser is not None else 0
        delta.singular.register_post_accumulate_grad_hook(self._backward_done)
        delta.drive_watch = self

    def _backward_done(self, param: Any) -> None:
        self.backwards += 1

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(f"AdaLoRA module '{self.module_name}': {message}; {ADVICE}", UserWarning, stacklevel=4)

    def forward_check(self, delta: nn.Module) -> None:
        """At a training forward: gradients cleared after a backward, and no optimizer-step call in between."""
        if self.backwards and delta.singular.grad is None:
            self._warn("allocator", "the gradients were cleared after a backward pass without "
                                    "unipelt.optim.on_optimizer_step: the rank allocator is not being driven, so this "
                                    "trains as a fixed-rank SVD adapter without AdaLoRA's rank budget")

    def stepped(self, step: int) -> None:
        """on_optimizer_step ran: the allocator is driven; was the regulariser added since the last step?"""
        self.backwards = 0
        reg = self.regulariser
        if reg is None or reg.weight == 0:
            return
        if reg.calls == self.regulariser_calls:
            self._warn("regulariser", f"optimizer step {step} was taken without "
                                      "unipelt.optim.regularization_loss(model) in the loss: this trains without "
                                      "AdaLoRA's orthogonal regulariser")
        self.regulariser_calls = reg.calls

    def unscored(self, budget: int) -> None:
        """A masking step before any importance score exists: all scores are zero and the threshold prunes every
        triplet (what PEFT's allocator would crash on)."""
        self._warn("unscored", f"masking to a budget of {budget} before any importance score was computed, so every "
                               "triplet is pruned (rank 0): the schedule leaves no step to score before it (tinit / "
                               "tfinal against the run's total steps), or a resume lost the checkpoint's training "
                               "state")

    def restored(self) -> None:
        """Training state was loaded (a resume): count afresh."""
        self.backwards = 0
        if self.regulariser is not None:
            self.regulariser_calls = self.regulariser.calls


__all__ = ["DriveWatch"]
