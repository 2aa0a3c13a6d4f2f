"""Evaluation of a prompt classifier: class text features once, then per-task argmax over images."""

from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import DataLoader

from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.metrics import group_metrics
from softcpt_dist.progress import progress


@torch.no_grad()
def predict(model, loader: DataLoader, group: TaskGroup, show_progress: bool = False, desc: str = "eval"):
    """Within-task predictions for every sample: ``(tasks, labels, preds)``."""
    was_training = model.training
    model.eval()
    class_features = model.method()  # once per evaluation, not per batch
    class_task = group.class_task().to(class_features.device)
    offsets = torch.as_tensor(group.offsets, device=class_features.device)
    all_tasks, all_labels, all_preds = [], [], []
    for images, tasks, labels, _ in progress(loader, desc=desc, enabled=show_progress):
        tasks = tasks.to(class_features.device)
        logits = model(images, class_features=class_features)
        logits = logits.masked_fill(class_task.unsqueeze(0) != tasks.unsqueeze(1), float("-inf"))
        all_preds.append(logits.argmax(dim=1) - offsets[tasks])
        all_tasks.append(tasks)
        all_labels.append(labels.to(class_features.device))
    model.train(was_training)
    return torch.cat(all_tasks).cpu(), torch.cat(all_labels).cpu(), torch.cat(all_preds).cpu()


def evaluate(model, loader: DataLoader, group: TaskGroup, show_progress: bool = False,
             desc: str = "eval") -> Dict:
    tasks, labels, preds = predict(model, loader, group, show_progress, desc)
    return group_metrics(group, tasks, labels, preds)
