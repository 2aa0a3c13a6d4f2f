"""Deterministic K-shot subsets: K images per class of every task, a pure function of (seed, K)."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

from softcpt_dist.data.dataset import Sample
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.seeding import keyed_random


def fewshot_subset(samples: List[Sample], shots: int, seed: int,
                   group: TaskGroup) -> Tuple[List[Sample], Dict[Tuple[int, int], int]]:
    """Pick ``shots`` samples per (task, class); returns the subset and the classes that had fewer.

    Each class draws from its own RNG seeded by (seed, shots, task key, class name), so the choice
    for one class depends neither on the other classes, nor on the order samples were listed in,
    nor on the task's position in the group (a task run alone gets the same subset as in its group).
    """
    if shots <= 0:
        return list(samples), {}
    by_class: Dict[Tuple[int, int], List[Sample]] = defaultdict(list)
    for s in samples:
        by_class[(s.task, s.label)].append(s)
    chosen, short = [], {}
    for key in sorted(by_class):
        pool = sorted(by_class[key], key=lambda s: s.path)
        task = group.tasks[key[0]]
        rng = keyed_random(seed, shots, task.key, task.classnames[key[1]])
        if len(pool) < shots:
            short[key] = len(pool)
            chosen.extend(pool)
        else:
            chosen.extend(rng.sample(pool, shots))
    return chosen, short
