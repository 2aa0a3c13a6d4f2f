"""Per-task metrics as in the paper and their report (JSON + Markdown)."""

from __future__ import annotations

from typing import Dict, List

import torch

from softcpt_dist.data.tasks import TaskGroup


def task_metric(preds: torch.Tensor, labels: torch.Tensor, num_classes: int, metric: str) -> float:
    """Accuracy in percent: overall, or the mean of per-class accuracies over classes present."""
    if labels.numel() == 0:
        return float("nan")
    correct = (preds == labels).float()
    if metric == "accuracy":
        return 100.0 * correct.mean().item()
    per_class_total = torch.bincount(labels, minlength=num_classes).float()
    per_class_correct = torch.bincount(labels, weights=correct, minlength=num_classes)
    present = per_class_total > 0
    return 100.0 * (per_class_correct[present] / per_class_total[present]).mean().item()


def group_metrics(group: TaskGroup, tasks: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> Dict:
    """``{"tasks": {key: {...}}, "mean": unweighted mean over tasks}``; preds/labels are within-task."""
    per_task = {}
    for i, task in enumerate(group.tasks):
        sel = tasks == i
        per_task[task.key] = {
            "name": task.name,
            "metric": task.metric,
            "value": task_metric(preds[sel], labels[sel], task.num_classes, task.metric),
            "num_samples": int(sel.sum()),
            "num_classes": task.num_classes,
        }
    values = [v["value"] for v in per_task.values() if v["num_samples"] > 0]
    return {"tasks": per_task, "mean": sum(values) / len(values) if values else float("nan")}


def markdown_table(results: Dict, title: str) -> str:
    lines = [f"## {title}", "", "| task | name | metric | classes | samples | value (%) |", "|---|---|---|---|---|---|"]
    for key, r in results["tasks"].items():
        lines.append(f"| {key} | {r['name']} | {r['metric']} | {r['num_classes']} | {r['num_samples']} "
                     f"| {r['value']:.2f} |")
    lines.append(f"| **mean** | | | | | **{results['mean']:.2f}** |")
    return "\n".join(lines) + "\n"


def merge_task_results(parts: List[Dict], group: TaskGroup) -> Dict:
    """Combine results of per-task runs (CoOp CA/CS) into one group result in the group's order."""
    tasks = {}
    for part in parts:
        tasks.update(part["tasks"])
    ordered = {t.key: tasks[t.key] for t in group.tasks}
    values = [v["value"] for v in ordered.values() if v["num_samples"] > 0]
    return {"tasks": ordered, "mean": sum(values) / len(values) if values else float("nan")}
