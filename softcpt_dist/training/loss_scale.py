"""Dynamic loss scaling for ``model.precision=official_amp`` (the official code's ``PREC=amp``): the rules of
``torch.amp.GradScaler`` with its defaults, kept outside the optimizer so that DeepSpeed's engine can own it.

The loss is multiplied by the scale before backward; at the accumulation boundary the (reduced) gradients
are multiplied by the scale's fp32 reciprocal and checked: a non-finite value anywhere skips that optimizer
step and halves the scale; otherwise the step is taken, and after ``growth_interval`` steps in a row without
one the scale doubles. Its state (scale, steps since the last skip) is saved with the engine's checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable

import torch


class LossScale:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0  # steps since the last skipped one (GradScaler's growth tracker)
        self.skipped = 0

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * torch.tensor(self.scale, dtype=torch.float32, device=loss.device)

    def unscale(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Unscale every gradient in place; whether all are finite (the step may be taken)."""
        inverse = torch.tensor(self.scale, dtype=torch.float32).reciprocal()
        finite = True
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inverse.to(p.grad.device))
                finite = finite and bool(torch.isfinite(p.grad).all())
        return finite

    def update(self, stepped: bool) -> None:
        if not stepped:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> Dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.scale, self.good_steps, self.skipped = float(state["scale"]), int(state["good_steps"]), \
            int(state["skipped"])


@contextmanager
def skipped_step(optimizer: torch.optim.Optimizer):
    """``optimizer.step()`` does nothing inside (a step with non-finite gradients: the engine's bookkeeping,
    gradient zeroing included, goes on; parameters and momentum stay as they were)."""
    own = optimizer.__dict__.get("step")  # an instance attribute (a wrapper's), else the class's method
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own
