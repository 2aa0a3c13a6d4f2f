"""Evaluation of a prompt classifier: class text features once, then per-task argmax over images.

The class features are computed once per evaluation, each rank encoding its share of the classes
when text sharding is on (``PromptClassifier.class_features``).

Distributed: each rank predicts its own shard (samples ``rank::world``, nothing padded or
repeated), and the predictions of all ranks are gathered, so metrics are exact at any world size.
Under ZeRO-3, ranks with a shorter shard run dummy forwards on their last batch (results dropped)
so that every rank calls the model equally often, as its collective parameter gathering requires.
A split with fewer samples than ranks is not sharded: every rank evaluates all of it.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import DataLoader

from softcpt_dist import distributed as D
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.metrics import group_metrics
from softcpt_dist.model.loss import TaskTargets
from softcpt_dist.progress import progress
from softcpt_dist.training.engine import is_partitioned


@torch.no_grad()
def predict(model, loader: DataLoader, group: TaskGroup, show_progress: bool = False, desc: str = "eval"):
    """Within-task predictions ``(tasks, labels, preds)`` of the loader's samples; for a sharded loader
    (``loader.sharded``) those of all ranks' shards, gathered."""
    was_training = model.training
    model.eval()
    # Once per evaluation (sharded over ranks), not per batch; an image-conditional method's per batch.
    class_features = None if model.image_conditional else model.class_features()
    device = model.backbone.device
    class_task = group.class_task().to(device)
    offsets = torch.as_tensor(group.offsets, device=device)
    sharded = getattr(loader, "sharded", False)
    parts, last = [], None
    for inputs, tasks, labels, _ in progress(loader, desc=desc, enabled=show_progress and D.rank() == 0):
        tasks = tasks.to(device)
        scores = model(inputs, class_features=class_features, targets=TaskTargets(tasks, class_task))
        preds = scores.predictions - offsets[tasks]
        parts.append((tasks.cpu(), labels.cpu(), preds.cpu()))
        last = inputs
    if sharded and is_partitioned(model):
        # ZeRO-3 gathers parameters collectively in every forward: all ranks must run as many.
        n_batches = int(D.all_reduce(torch.tensor([len(loader)]), op=torch.distributed.ReduceOp.MAX)[0])
        for _ in range(n_batches - len(loader)):
            # shards are never empty: `last` and `tasks` exist
            model(last, class_features=class_features, targets=TaskTargets(tasks, class_task))
    model.train(was_training)
    local = tuple(torch.cat(x) for x in zip(*parts))
    if not sharded:
        return local
    gathered = D.all_gather_objects(local)
    return tuple(torch.cat([g[i] for g in gathered]) for i in range(3))


def evaluate(model, loader: DataLoader, group: TaskGroup, show_progress: bool = False,
             desc: str = "eval") -> Dict:
    tasks, labels, preds = predict(model, loader, group, show_progress, desc)
    return group_metrics(group, tasks, labels, preds)
