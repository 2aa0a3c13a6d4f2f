"""Task groups: tasks with names, class names and metrics, and the global class index they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

METRICS = ("accuracy", "mean_per_class_accuracy")


class DataError(ValueError):
    """Bad data or task definitions; the message names the file, task or class."""


def clean_classname(name: str) -> str:
    """CoOp's clean-up of folder-style class names: underscores become spaces (and runs of blanks one)."""
    return " ".join(name.replace("_", " ").split())


@dataclass(frozen=True)
class TaskSpec:
    key: str  # short identifier (folder name, CLI name)
    name: str  # natural-language task name used in the task prompt ("pants type")
    classnames: tuple  # natural-language class names, in label order
    metric: str = "accuracy"  # accuracy | mean_per_class_accuracy
    template: str = "a photo of a {}."  # zero-shot template

    def __post_init__(self):
        if not self.classnames:
            raise DataError(f"task {self.key!r} has no classes")
        dupes = sorted({c for c in self.classnames if list(self.classnames).count(c) > 1})
        if dupes:
            raise DataError(f"task {self.key!r} has duplicate class names: {dupes}")
        if self.metric not in METRICS:
            raise DataError(f"task {self.key!r}: metric {self.metric!r} is not one of {list(METRICS)}")
        if "{}" not in self.template:
            raise DataError(f"task {self.key!r}: zero-shot template {self.template!r} has no '{{}}'")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass
class TaskGroup:
    """An ordered list of tasks; classes of all tasks are laid out task by task in one global index."""

    tasks: List[TaskSpec]
    offsets: List[int] = field(init=False)

    def __post_init__(self):
        if not self.tasks:
            raise DataError("a task group needs at least one task")
        keys = [t.key for t in self.tasks]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise DataError(f"duplicate task keys in the group: {dupes}")
        self.offsets, total = [], 0
        for t in self.tasks:
            self.offsets.append(total)
            total += t.num_classes

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return self.offsets[-1] + self.tasks[-1].num_classes

    @property
    def classnames(self) -> List[str]:
        return [c for t in self.tasks for c in t.classnames]

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    def class_task(self) -> torch.Tensor:
        """Task index of every global class, ``[num_classes]``."""
        return torch.cat([torch.full((t.num_classes,), i, dtype=torch.long) for i, t in enumerate(self.tasks)])

    def global_labels(self, tasks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.offsets, device=tasks.device)[tasks] + labels

    def index(self, key_or_name: str) -> int:
        for i, t in enumerate(self.tasks):
            if key_or_name in (t.key, t.name):
                return i
        raise DataError(f"unknown task {key_or_name!r}; tasks: {[t.key for t in self.tasks]}")

    def subset(self, indices: Sequence[int]) -> "TaskGroup":
        return TaskGroup([self.tasks[i] for i in indices])

    def task_weights(self, by_name: Optional[Dict[str, float]]) -> Optional[torch.Tensor]:
        """Per-task loss weights from a {task key or name: weight} mapping (missing tasks weigh 1)."""
        if not by_name:
            return None
        weights = torch.ones(len(self.tasks))
        for name, w in by_name.items():
            try:
                weights[self.index(name)] = float(w)
            except DataError as err:
                raise DataError(f"train.task_weights: {err}") from err
        return weights
