"""The multi-task loss equals an independent per-task computation (paper Eq. 8)."""

import pytest
import torch
import torch.nn.functional as F

from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model.loss import cosine_logits, multitask_cross_entropy

GROUP = TaskGroup([TaskSpec("a", "task a", ("x",)),  # a task with a single class
                   TaskSpec("b", "task b", tuple(f"b{i}" for i in range(5))),
                   TaskSpec("c", "task c", tuple(f"c{i}" for i in range(3)))])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = torch.tensor([1, 0, 2, 1, 2, 2, 1])
    labels = torch.tensor([4, 0, 2, 0, 1, 0, 3])
    img = torch.randn(len(tasks), 8, generator=g)
    txt = torch.randn(GROUP.num_classes, 8, generator=g)
    return tasks, labels, img, txt


def _reference(tasks, labels, img, txt, scale, weights=None):
    """Loop over tasks: each task's samples against that task's own class features only."""
    total = torch.zeros(())
    for t, task in enumerate(GROUP.tasks):
        sel = tasks == t
        if not sel.any():
            continue
        cls = txt[GROUP.offsets[t]: GROUP.offsets[t] + task.num_classes]
        logits = scale.exp() * F.normalize(img[sel], dim=-1) @ F.normalize(cls, dim=-1).t()
        ce = F.cross_entropy(logits, labels[sel], reduction="sum")
        total = total + (weights[t] if weights is not None else 1.0) * ce
    return total / len(tasks)


@pytest.mark.parametrize("weights", [None, torch.tensor([0.5, 2.0, 1.0])])
def test_loss_matches_per_task_reference(weights):
    tasks, labels, img, txt = _batch()
    scale = torch.tensor(4.6052)
    logits = cosine_logits(img, txt, scale)
    loss = multitask_cross_entropy(logits, tasks, GROUP.global_labels(tasks, labels), GROUP.class_task(), weights)
    ref = _reference(tasks, labels, img, txt, scale, weights)
    assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-6)


def test_loss_gradients_match_reference():
    tasks, labels, img, txt = _batch(1)
    scale = torch.tensor(2.0)
    a = txt.clone().requires_grad_()
    b = txt.clone().requires_grad_()
    multitask_cross_entropy(cosine_logits(img, a, scale), tasks, GROUP.global_labels(tasks, labels),
                            GROUP.class_task()).backward()
    _reference(tasks, labels, img, b, scale).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_single_class_task_contributes_zero_loss():
    tasks = torch.tensor([0, 0])
    logits = torch.randn(2, GROUP.num_classes)
    loss = multitask_cross_entropy(logits, tasks, torch.tensor([0, 0]), GROUP.class_task())
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_target_outside_its_task_is_an_error():
    logits = torch.randn(1, GROUP.num_classes)
    with pytest.raises(ValueError, match="does not belong"):
        multitask_cross_entropy(logits, torch.tensor([1]), torch.tensor([0]), GROUP.class_task())
