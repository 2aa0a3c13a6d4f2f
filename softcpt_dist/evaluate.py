"""Evaluation of a prompt classifier: class text features once, then per-task argmax over images.

Distributed: each rank predicts its own shard (samples ``rank::world``, nothing padded or
repeated), and the predictions of all ranks are gathered, so metrics are exact at any world size.
Ranks with a shorter shard run dummy forwards on their last batch (results dropped) so that every
rank calls the model equally often, which ZeRO-3's collective parameter gathering requires.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import DataLoader

from softcpt_dist import distributed as D
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.metrics import group_metrics
from softcpt_dist.progress import progress


@torch.no_grad()
def predict(model, loader: DataLoader, group: TaskGroup, show_progress: bool = False, desc: str = "eval"):
    """Within-task predictions of this rank's shard, gathered over ranks: ``(tasks, labels, preds)``."""
    was_training = model.training
    model.eval()
    class_features = model.method()  # once per evaluation, not per batch
    device = class_features.device
    class_task = group.class_task().to(device)
    offsets = torch.as_tensor(group.offsets, device=device)
    n_batches = int(D.all_reduce(torch.tensor([len(loader)]), op=torch.distributed.ReduceOp.MAX)[0])
    parts, last = [], None
    for inputs, tasks, labels, _ in progress(loader, desc=desc, enabled=show_progress and D.rank() == 0):
        tasks = tasks.to(device)
        logits = model(inputs, class_features=class_features)
        logits = logits.masked_fill(class_task.unsqueeze(0) != tasks.unsqueeze(1), float("-inf"))
        parts.append((tasks.cpu(), labels.cpu(), (logits.argmax(dim=1) - offsets[tasks]).cpu()))
        last = inputs
    for _ in range(n_batches - len(loader)):
        model(last if last is not None else _dummy_inputs(model, loader), class_features=class_features)
    model.train(was_training)
    local = tuple(torch.cat(x) if x else torch.empty(0, dtype=torch.long) for x in zip(*parts)) if parts else \
        (torch.empty(0, dtype=torch.long),) * 3
    gathered = D.all_gather_objects(local)
    return tuple(torch.cat([g[i] for g in gathered]) for i in range(3))


def _dummy_inputs(model, loader):
    """A one-sample input for a rank whose shard is empty (tiny test sets, many ranks)."""
    sample = loader.dataset[0] if len(loader.dataset) else None
    if sample is None:
        raise ValueError("a rank has no evaluation samples and no input to run the collective forward with")
    return sample[0].unsqueeze(0)


def evaluate(model, loader: DataLoader, group: TaskGroup, show_progress: bool = False,
             desc: str = "eval") -> Dict:
    tasks, labels, preds = predict(model, loader, group, show_progress, desc)
    return group_metrics(group, tasks, labels, preds)
