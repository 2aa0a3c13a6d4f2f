"""Cosine logits and the multi-task loss of SoftCPT (paper Eq. 8).

Each sample is classified only among its own task's classes: softmax cross-entropy over that
task's columns, summed over the batch (i.e. over tasks) and divided by the batch size. The
dispatchers (``cosine_cross_entropy``, ``within_task_predict``) run the fused Triton kernels
(``kernels/cosine_ce.py``) where they apply; the PyTorch path here is their reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from softcpt_dist.kernels.cosine_ce import fused_applies, fused_cosine_cross_entropy, fused_within_task_predict
from softcpt_dist.model.batch_invariance import rowwise


class TaskTargets(NamedTuple):
    """What a batch is scored against: each sample's task ``[B]``, the task of each encoded column
    ``class_task [C]``, and for a loss the target columns ``[B]`` and optional per-task weights ``[T]``."""

    tasks: torch.Tensor
    class_task: torch.Tensor
    targets: Optional[torch.Tensor] = None
    task_weights: Optional[torch.Tensor] = None


class TaskScores(NamedTuple):
    """The multi-task loss (None without targets) and each sample's within-task predicted column."""

    loss: Optional[torch.Tensor]
    predictions: torch.Tensor


def cosine_logits(image_features: torch.Tensor, class_features: torch.Tensor,
                  logit_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``exp(logit_scale) * cos(image, class)``, ``[B, C]`` in ``dtype`` (fp32; fp16 in
    ``model.precision=official_fp16``, where the scale stays fp32 as the official code's)."""
    img = F.normalize(image_features.to(dtype), dim=-1)
    txt = F.normalize(class_features.to(dtype), dim=-1)
    return (logit_scale.float().exp() * rowwise(lambda rows: rows @ txt.t(), img)).to(dtype)


def column_positions(class_index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes]``: each global class's column in ``class_index`` (the renumbered columns of a
    selection), -1 for classes not selected."""
    position = torch.full((num_classes,), -1, dtype=torch.long, device=class_index.device)
    position[class_index] = torch.arange(len(class_index), device=class_index.device)
    return position


def within_task_mask(tasks: torch.Tensor, class_task: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: True where column c belongs to sample b's task (the only columns it is scored on)."""
    return class_task.unsqueeze(0) == tasks.unsqueeze(1)


def within_task_argmax(logits: torch.Tensor, tasks: torch.Tensor, class_task: torch.Tensor) -> torch.Tensor:
    """Predicted column of every sample, among its own task's columns only."""
    return logits.masked_fill(~within_task_mask(tasks, class_task), float("-inf")).argmax(dim=1)


def multitask_cross_entropy(logits: torch.Tensor, tasks: torch.Tensor, targets: torch.Tensor,
                            class_task: torch.Tensor, task_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-task softmax cross-entropy, summed over samples and divided by the batch size.

    logits ``[B, C]`` over columns whose tasks are ``class_task`` ``[C]``; ``targets`` ``[B]`` are
    column indices (each inside its sample's task); ``task_weights`` ``[T]`` optionally scales
    each task's terms. Columns of other tasks are masked out of each sample's softmax, which is
    exactly a softmax over the sample's own task. fp16 logits (``model.precision=official_fp16``) give an
    fp16 loss, as the official code's; others are taken in fp32.
    """
    if logits.shape[0] == 0:
        raise ValueError("empty batch")
    own = within_task_mask(tasks, class_task)
    if not bool(own.gather(1, targets.unsqueeze(1)).all()):
        raise ValueError("a target column does not belong to its sample's task")
    masked = (logits if logits.dtype == torch.float16 else logits.float()).masked_fill(~own, float("-inf"))
    per_sample = F.cross_entropy(masked, targets, reduction="none")
    if task_weights is not None:
        per_sample = per_sample * task_weights.to(per_sample.device)[tasks]
    return per_sample.sum() / logits.shape[0]


def cosine_cross_entropy(image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: torch.Tensor,
                         tasks: torch.Tensor, targets: torch.Tensor, class_task: torch.Tensor,
                         task_weights: Optional[torch.Tensor] = None,
                         enabled: str = "auto", dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: ``(loss, predictions)``: ``multitask_cross_entropy`` of ``cosine_logits`` and each sample's
    within-task argmax column; fused (no batch x classes matrix) where ``kernels.enabled`` and the tensors
    allow, else the PyTorch path; ``dtype``: of the logits and loss (fp16: always the PyTorch path, whose
    rounding is the official code's)."""
    if image_features.shape[0] == 0:
        raise ValueError("empty batch")
    if dtype == torch.float32 and fused_applies(enabled, image_features, class_features, logit_scale, tasks,
                                                class_task, targets):
        return fused_cosine_cross_entropy(image_features, class_features, logit_scale, tasks, targets, class_task,
                                          task_weights)
    logits = cosine_logits(image_features, class_features, logit_scale, dtype)
    loss = multitask_cross_entropy(logits, tasks, targets, class_task, task_weights)
    with torch.no_grad():
        return loss, within_task_argmax(logits, tasks, class_task)


def within_task_predict(image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: torch.Tensor,
                        tasks: torch.Tensor, class_task: torch.Tensor, enabled: str = "auto",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dispatcher, evaluation entry: each sample's predicted column among its own task's columns."""
    if dtype == torch.float32 and fused_applies(enabled, image_features, class_features, logit_scale, tasks,
                                                class_task):
        return fused_within_task_predict(image_features, class_features, logit_scale, tasks, class_task)
    return within_task_argmax(cosine_logits(image_features, class_features, logit_scale, dtype), tasks, class_task)
