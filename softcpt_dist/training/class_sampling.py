"""Class sampling: the classes one training step encodes and scores (the official ``CLS_SAMPLE_RATE``).

Per task present in the batch: every class some sample of the batch belongs to (the positives) plus
``ceil(rate * #other classes)`` of the task's other classes drawn at random. The loss is each sample's
cross-entropy over its task's selected classes only (the official ``mutitask_loss2``); classes of
tasks absent from the batch enter no loss and are not encoded. Evaluation always uses every class.

Ranks agree on the selection: the positives are those of the global micro-batch (one all-reduce of a
``[C]`` mask) and the negatives come from a generator seeded by the run's seed and the step, so a
resumed run and any number of ranks draw the classes a single process would.
"""

from __future__ import annotations

import math

import torch

from softcpt_dist import distributed as D
from softcpt_dist.data.tasks import TaskGroup


def sample_classes(group: TaskGroup, positive: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted global class indices to encode, given the batch's positive-class mask ``positive [C]`` (bool):
    per task with a positive class, its positives and ``ceil(rate * #negatives)`` random negatives."""
    chosen = []
    for t, task in enumerate(group.tasks):
        start = group.offsets[t]
        mask = positive[start:start + task.num_classes]
        if not bool(mask.any()):
            continue
        negatives = torch.nonzero(~mask).flatten()
        keep = negatives[torch.randperm(len(negatives), generator=generator)[:math.ceil(len(negatives) * rate)]]
        chosen.append(torch.cat([torch.nonzero(mask).flatten(), keep]) + start)
    return torch.sort(torch.cat(chosen)).values


class ClassSampler:
    """``sampler(targets, step)`` -> the global class indices step ``step`` encodes (on ``targets``' device).

    ``targets``: this rank's global class labels of the micro-batch; ``seed``: the run's seed (and scope),
    fixed for the run, so the draw of a step is reproducible across resumes and ranks."""

    def __init__(self, group: TaskGroup, rate: float, seed: int):
        self.group, self.rate, self.seed = group, rate, seed

    def __call__(self, targets: torch.Tensor, step: int) -> torch.Tensor:
        positive = torch.zeros(self.group.num_classes, dtype=torch.float32)
        positive[targets.cpu()] = 1.0
        positive = D.all_reduce(positive) > 0  # the global micro-batch's positives
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return sample_classes(self.group, positive, self.rate, generator).to(targets.device)
