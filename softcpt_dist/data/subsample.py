"""Base and new halves of a task group: classes (base-to-new generalisation) and tasks (unseen tasks).

The official splits (``DATASET.SUBSAMPLE_CLASSES`` and ``SUBSAMPLE_TASKS`` of kding1225/softcpt, as
CoCoOp's): of ``n`` items in list order, base is the first ``ceil(n / 2)``, new the rest; the kept items
are renumbered from 0. Applied after the few-shot cut, so that a base run trains on the same images as
a run on all classes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import List

from softcpt_dist.data.dataset import MultiTaskData, Sample
from softcpt_dist.data.tasks import DataError, TaskGroup

HALVES = ("all", "base", "new")


def half(n: int, which: str) -> List[int]:
    """Indices of ``which`` half (all | base | new) of ``n`` items in order."""
    if which not in HALVES:
        raise ValueError(f"half: {which!r} is not one of {list(HALVES)}")
    base = math.ceil(n / 2)
    return list(range(n)) if which == "all" else list(range(base)) if which == "base" else list(range(base, n))


def subsample_tasks(data: MultiTaskData, which: str) -> MultiTaskData:
    """``data.subsample_tasks``: the base or new half of the tasks, renumbered."""
    if which == "all":
        return data
    keep = half(len(data.group), which)
    if not keep:
        raise DataError(f"data.subsample_tasks={which}: the group has {len(data.group)} task(s), its new half is "
                        "empty (unseen tasks need at least 2 tasks)")
    return data.select_tasks([data.group.tasks[i].key for i in keep])


def subsample_classes(data: MultiTaskData, which: str) -> MultiTaskData:
    """``data.subsample_classes``: each task's base or new half of its classes, relabelled from 0."""
    if which == "all":
        return data
    kept = [half(t.num_classes, which) for t in data.group.tasks]
    empty = [t.key for t, k in zip(data.group.tasks, kept) if not k]
    if empty:
        raise DataError(f"data.subsample_classes={which}: task(s) {empty} have a single class, so no new classes")
    group = TaskGroup([replace(t, classnames=tuple(t.classnames[i] for i in k)) for t, k in zip(data.group.tasks, kept)])
    relabel = [{old: new for new, old in enumerate(k)} for k in kept]
    splits = {name: [Sample(s.path, s.task, relabel[s.task][s.label]) for s in samples if s.label in relabel[s.task]]
              for name, samples in data.splits.items()}
    return MultiTaskData(group, splits, list(data.problems), dict(data.report))
