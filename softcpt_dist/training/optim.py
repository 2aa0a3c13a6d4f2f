"""Optimizer and the epoch-wise learning-rate schedule of the paper (Dassl's semantics).

The schedule is a pure function of how many times the scheduler has been stepped: during the
first ``warmup_epochs`` steps the lr is ``warmup_lr`` (constant) or ramps linearly to the base lr;
afterwards a cosine over ``epochs`` steps, restarted at the end of warm-up (Dassl's
``WARMUP_RECOUNT``) and continued periodically if stepped past its end (torch's chainable cosine).

``official_stepping`` reproduces the official SoftCPT code, which registers one SGD optimizer and
one scheduler under several module names and steps both once per name: every iteration applies
``k`` optimizer steps with the same gradient, and every epoch advances the schedule ``k`` times
(k = 3 for the NA variants, 4 for CA/CS, 1 for CoOp). Effective lr per epoch ``e >= 1`` is then the
cosine at index ``k*e - 1`` (warmup 1), so the schedule runs through ~k/2 cosine periods.
"""

from __future__ import annotations

import math
from typing import Iterable, List

import torch

from softcpt_dist.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no learnable parameters to optimize")
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate after ``step`` scheduler steps (``step`` = epochs finished, times k if official)."""
    warm = cfg.warmup_epochs
    if step < warm:
        if cfg.warmup_type == "linear":
            return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warm
        return cfg.warmup_lr
    if cfg.schedule == "constant":
        return cfg.lr
    t = step - warm
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * t / cfg.epochs))


class EpochLRSchedule:
    """Sets the optimizer's lr from ``lr_at``; ``step()`` once per epoch (k times if official)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig):
        self.optimizer, self.cfg, self.steps = optimizer, cfg, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.steps, self.cfg)

    def step(self) -> None:
        self.steps += 1
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._apply()


def steps_per_update(cfg: OptimConfig, method: torch.nn.Module) -> int:
    """Optimizer/scheduler steps per iteration/epoch: 1, or the official code's module count."""
    return int(getattr(method, "official_module_count", 1)) if cfg.official_stepping else 1


def epoch_lrs(cfg: OptimConfig, k: int = 1) -> List[float]:
    """The lr each epoch trains with, for documentation and tests."""
    return [lr_at(e * k, cfg) for e in range(cfg.epochs)]
