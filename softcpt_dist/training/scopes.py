"""Scopes: the tasks that share one prompt model -- all of them (joint), or one each (CoOp CA/CS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from softcpt_dist.config import MethodConfig, TrainConfig
from softcpt_dist.data.dataset import Sample
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.methods import method_class


@dataclass
class Scope:
    key: str  # "joint", or the task key
    task_indices: List[int]
    group: TaskGroup

    def indices(self, samples: List[Sample]) -> List[int]:
        """Positions of this scope's samples in ``samples``."""
        tasks = set(self.task_indices)
        return [i for i, s in enumerate(samples) if s.task in tasks]

    def select(self, samples: List[Sample], features: Optional[torch.Tensor] = None):
        """This scope's samples (task indices renumbered within the scope), and their feature rows."""
        local = {t: i for i, t in enumerate(self.task_indices)}
        idx = self.indices(samples)
        picked = [Sample(samples[i].path, local[samples[i].task], samples[i].label) for i in idx]
        return picked, (None if features is None else features[torch.as_tensor(idx, dtype=torch.long)])


def training_mode(train: TrainConfig, method: MethodConfig) -> str:
    """``train.mode``, or with ``auto`` the method's own: per task for CoOp CA/CS, else joint."""
    if train.mode != "auto":
        return train.mode
    return "per_task" if method_class(method).per_task(method) else "joint"


def scopes(train: TrainConfig, method: MethodConfig, group: TaskGroup) -> List[Scope]:
    if training_mode(train, method) == "joint" or not method_class(method).trains_prompts:
        return [Scope("joint", list(range(len(group))), group)]
    return [Scope(t.key, [i], group.subset([i])) for i, t in enumerate(group.tasks)]
