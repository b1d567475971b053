"""The non-finite guard: a step whose loss or gradient norm is NaN or inf is skipped.

Skipping means the optimizer sees no gradients (every `.grad` set to None), so neither the
weights nor AdamW's moments change; the learning-rate schedule still advances with the
step count. Skipped steps are counted (`train/skipped_steps`). After `max_consecutive`
skipped steps in a row the run stops with `NonFiniteError` naming the steps; nothing is
saved then, so the last good checkpoint stays the newest.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class NonFiniteGuard(Callback):
    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._loss_finite = True

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        norm = grad_norm(trainer.strategy, params)
        bad = not (self._loss_finite and bool(torch.isfinite(norm)))
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._loss_finite = True
        if bad:
            for p in params:
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        pl_module.log("train/skipped_steps", float(self.skipped))
        if self.consecutive >= self.max_consecutive:
            step = trainer.global_step + 1
            raise NonFiniteError(
                f"steps {step - self.consecutive + 1}..{step}: loss or gradient norm not "
                f"finite {self.consecutive} times in a row; stopped without saving (the last "
                f"good checkpoint is kept). Lower the learning rate or check the data")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict.get("skipped", 0)
        self.consecutive = state_dict.get("consecutive", 0)


def grad_norm(strategy, params: list[torch.Tensor]) -> torch.Tensor:
    """The global gradient 2-norm: the parallel strategy's (over every stage and shard), or
    the plain one of this process's gradients."""
    if hasattr(strategy, "grad_norm"):
        return strategy.grad_norm(params)
    if not params:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm([p.grad for p in params])
