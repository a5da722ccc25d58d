"""AdaLoRA's rank allocator: importance scores and the cubic budget schedule over all svd slots of a module.

Built by the svd form (one per module spec); driven only through the training contract (unipelt/optim.py):
`on_optimizer_step(step, total_steps)` after each optimizer step, before the gradients are cleared (called without
gradients it raises: scores would stay zero and the next masking step would prune everything). A loop that never
calls it is warned once (watch.py). All target matrices of one svd module spec share one global
budget b(t) of kept triplets (Zhang et al. 2023, eqs. 7-12):

- sensitivity I = |w ⊙ ∇w|; smoothed Ī ← β1·Ī + (1−β1)·I; uncertainty Ū ← β2·Ū + (1−β2)·|I − Ī|; s = Ī·Ū
- triplet score S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)
- b(t) = b0 for t ≤ t_i; b_T + (b0 − b_T)·(1 − (t − t_i)/(T − t_i − t_f))³ until T − t_f; b_T afterwards,
  with b0 = init_r and b_T = target_r per target matrix.

As in the reference code (loralib/adalora.py) and PEFT: scores are updated at steps t < T − t_f; at steps
t_i < t < T − t_f with t a multiple of delta_t, the triplets whose score is at or below the k-th smallest
(k = b0 − b(t)) have their λ zeroed -- only λ, so a pruned triplet keeps its gradient and can come back; at
t = T − t_f the pattern is fixed at the target, and from then on it is applied at every step (the forward
multiplies by it, so the pruned triplets contribute nothing and are dropped when saved).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ...errors import UnipeltError
from ...full_tensor import full
from .delta import SVDDelta
from .watch import DriveWatch


class RankAllocator:
    """One global rank budget over the svd forms of one module spec, keyed 'stack.layer.site'."""

    def __init__(self, spec: Any, forms: dict[str, "SVDDelta"], regulariser: Any = None) -> None:
        self.spec = spec
        self.forms = forms
        # says so (once) when a training loop does not drive this allocator or the module's regulariser (watch.py)
        self.watch = DriveWatch(spec.name, next(iter(forms.values())), regulariser) if forms else None
        self.initial_budget = spec.init_r * len(forms)
        self.target_budget = spec.target_r * len(forms)
        self.current_budget = self.initial_budget
        self.frozen = False
        self._ema: dict[int, torch.Tensor] = {}
        self._uncertainty: dict[int, torch.Tensor] = {}

    def schedule_steps(self, total_steps: int) -> tuple[int, int]:
        """(t_i, t_f) in steps: ints are steps, floats fractions of the run."""
        def steps(value: int | float) -> int:
            return int(round(value * total_steps)) if isinstance(value, float) else int(value)
        return steps(self.spec.tinit), steps(self.spec.tfinal)

    def budget(self, step: int, total_steps: int) -> int:
        tinit, tfinal = self.schedule_steps(total_steps)
        end = total_steps - tfinal
        if step >= end:
            return self.target_budget
        if step <= tinit:
            return self.initial_budget
        progress = (step - tinit) / (end - tinit)
        return int(self.target_budget + (self.initial_budget - self.target_budget) * (1 - progress) ** 3)

    @property
    def total_rank(self) -> int:
        """The total rank the allocator kept at its last masking step (the schedule's b(t))."""
        return sum(form.allocated_rank for form in self.forms.values())

    def rank_pattern(self) -> dict[str, int]:
        return {key: form.effective_rank for key, form in self.forms.items()}

    @torch.no_grad()
    def _update_scores(self, step: int) -> None:
        beta1, beta2 = self.spec.beta1, self.spec.beta2
        if all(p.grad is None for form in self.forms.values() for p in (form.left, form.singular, form.right)):
            # scoring without gradients keeps every score at zero, and the next masking step prunes every triplet
            raise UnipeltError(f"AdaLoRA module '{self.spec.name}': on_optimizer_step(step {step}) found no "
                               "gradients; call it after optimizer.step() and before the gradients are cleared "
                               "(zero_grad), e.g. in TrainerCallback.on_optimizer_step, not on_step_end")
        for form in self.forms.values():
            for param in (form.left, form.singular, form.right):
                if param.grad is None:
                    continue
                # sharded (FSDP): the whole parameter and its whole reduced gradient, so every rank scores alike
                sensitivity = (full(param) * full(param.grad)).abs().float()
                key = id(param)
                if key not in self._ema:
                    self._ema[key] = torch.zeros_like(sensitivity)
                    self._uncertainty[key] = torch.zeros_like(sensitivity)
                self._ema[key].mul_(beta1).add_((1 - beta1) * sensitivity)
                self._uncertainty[key].mul_(beta2).add_((1 - beta2) * (sensitivity - self._ema[key]).abs())

    def _score(self, param: torch.Tensor) -> torch.Tensor:
        if id(param) not in self._ema:
            return torch.zeros(param.shape, device=param.device)
        return self._ema[id(param)] * self._uncertainty[id(param)]

    def triplet_scores(self, form: "SVDDelta") -> torch.Tensor:
        return (self._score(form.singular) + self._score(form.left).mean(dim=0)
                + self._score(form.right).mean(dim=1))

    @torch.no_grad()
    def mask_to(self, budget: int, final: bool = False) -> None:
        """Zero λ of every triplet scoring at or below the (b0 − budget)-th smallest score over all forms (the
        reference's kthvalue threshold, ties included)."""
        if not self._ema and self.watch is not None:  # nothing scored: every score is zero, every triplet pruned
            self.watch.unscored(budget)
        scores = [self.triplet_scores(form) for form in self.forms.values()]
        flat = torch.cat([s.to("cpu") for s in scores])
        pruned_count = flat.shape[0] - min(budget, flat.shape[0])
        if pruned_count > 0:
            keep = flat > torch.kthvalue(flat, pruned_count).values
        else:
            keep = torch.ones(flat.shape[0], dtype=torch.bool)
        start = 0
        for form in self.forms.values():
            form.apply_mask(keep[start:start + form.rank], final=final)
            start += form.rank
        self.current_budget = budget

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        tinit, tfinal = self.schedule_steps(total_steps)
        end = total_steps - tfinal
        if self.frozen:  # the final phase: the fixed pattern, applied again after every step
            for form in self.forms.values():
                form.apply_mask(form.rank_mask.clone(), final=True)
        else:
            if step < end:
                self._update_scores(step)
            if step >= end:  # the final fine-tuning phase: fix the pattern at the target budget
                self.mask_to(self.target_budget, final=True)
                self.frozen = True
            elif step > tinit and step % self.spec.delta_t == 0:
                self.mask_to(self.budget(step, total_steps))
        if self.watch is not None:  # driven (an error above says what went wrong instead)
            self.watch.stepped(step)

    def training_metrics(self) -> dict[str, float]:
        return {"total_rank": float(self.total_rank), "budget": float(self.current_budget)}

    # --- what a resumable checkpoint carries: without it a resumed run would rescore from zero, in silence --------
    def _roles(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key, form in self.forms.items():
            for role in ("left", "singular", "right"):
                yield f"{key}.{role}", getattr(form, role)

    def training_state(self) -> dict[str, Any]:
        averages = {name: (self._ema[id(p)].cpu().clone(), self._uncertainty[id(p)].cpu().clone())
                    for name, p in self._roles() if id(p) in self._ema}
        return {"budget": self.current_budget, "frozen": self.frozen, "averages": averages,
                "masks": {key: (form.rank_mask.cpu().clone(), form.mask_is_final) for key, form in self.forms.items()}}

    @torch.no_grad()
    def load_training_state(self, state: dict[str, Any]) -> None:
        masks, averages = state["masks"], state["averages"]
        if set(masks) != set(self.forms):
            culprit = sorted(set(masks) ^ set(self.forms))[0]
            raise UnipeltError(f"AdaLoRA state of module '{self.spec.name}' does not match the model ('{culprit}')")
        for key, form in self.forms.items():  # every check before anything changes
            if masks[key][0].shape != form.rank_mask.shape:
                raise UnipeltError(f"AdaLoRA state of module '{self.spec.name}': rank mask of '{key}' has "
                                   f"{masks[key][0].shape[0]} triplets, the model {form.rank}")
        for key, form in self.forms.items():
            mask, final = masks[key]
            form.rank_mask.copy_(mask.to(form.rank_mask.device))
            form.mask_is_final = bool(final)
        self._ema, self._uncertainty = {}, {}
        for name, param in self._roles():
            if name in averages:
                self._ema[id(param)] = averages[name][0].to(param.device)
                self._uncertainty[id(param)] = averages[name][1].to(param.device)
        self.current_budget, self.frozen = int(state["budget"]), bool(state["frozen"])
        if self.watch is not None:
            self.watch.restored()

    def spec_changes(self) -> tuple[str, dict[str, Any]]:
        """(module name, option changes) that save_adapter writes into the method: the current ranks."""
        return self.spec.name, {"rank_pattern": tuple(sorted(self.rank_pattern().items()))}
