"""The fused cosine cross-entropy against ``softcpt_dist.model.loss``, fp32 under the interpreter.

Tasks of 1, 397 and other sizes. Bound: loss and every gradient within max|kernel - torch| /
max|torch| <= 1e-5 (the kernel folds the norms in after the dot product, the reference normalises
first); predictions equal.
"""

import pytest
import torch

from softcpt_dist.model.loss import cosine_cross_entropy, within_task_predict  # the dispatchers

from kernel_cases import rel_err, requires_gpu

SIZES = (1, 397, 5, 30, 2)
FP32_BOUND = 1e-5


def _batch(n=70, dim=96, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    class_task = torch.cat([torch.full((k,), t) for t, k in enumerate(SIZES)])
    offsets = torch.tensor((0,) + SIZES).cumsum(0)
    tasks = torch.randint(0, len(SIZES), (n,), generator=g)
    targets = torch.stack([offsets[t] + torch.randint(0, SIZES[t], (), generator=g) for t in tasks])
    img = torch.randn(n, dim, generator=g).to(device, dtype)
    txt = torch.randn(len(class_task), dim, generator=g).to(device, dtype)
    scale = torch.tensor(4.6052, device=device)
    return img, txt, scale, tasks.to(device), targets.to(device), class_task.to(device)


def _run(enabled, img, txt, scale, tasks, targets, class_task, weights=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (img, txt, scale)]
    loss, pred = cosine_cross_entropy(*leaves, tasks, targets, class_task, weights, enabled)
    loss.backward()
    return loss.detach(), pred, [t.grad for t in leaves]


@pytest.mark.slow
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_torch(interpreter, weighted):
    batch = _batch()
    weights = torch.rand(len(SIZES)) if weighted else None
    loss, pred, grads = _run("auto", *batch, weights)
    ref_loss, ref_pred, ref_grads = _run("off", *batch, weights)
    assert rel_err(loss, ref_loss) <= FP32_BOUND
    assert torch.equal(pred, ref_pred)
    for name, g, r in zip(("image", "class", "logit_scale"), grads, ref_grads):
        assert rel_err(g, r) <= FP32_BOUND, name


def test_one_task_batches_and_odd_dims(interpreter):
    """A batch of the 1-class task only (its loss is 0, its gradients 0), and of the 397-class task,
    with an embedding dimension that is not a multiple of the kernel's chunk."""
    img, txt, scale, tasks, targets, class_task = _batch(n=20, dim=70)
    for task, first in ((0, 0), (1, 1)):
        t = torch.full((20,), task)
        tg = first + torch.arange(20) % SIZES[task]
        loss, pred, grads = _run("auto", img, txt, scale, t, tg, class_task)
        ref_loss, ref_pred, ref_grads = _run("off", img, txt, scale, t, tg, class_task)
        assert torch.equal(pred, ref_pred)
        assert float((loss - ref_loss).abs()) <= FP32_BOUND * max(float(ref_loss), 1.0)
        assert float((grads[1] - ref_grads[1]).abs().max()) <= FP32_BOUND * max(float(ref_grads[1].abs().max()), 1.0)


def test_no_image_gradient_for_cached_features(interpreter):
    img, txt, scale, tasks, targets, class_task = _batch()
    leaf = txt.clone().requires_grad_(True)
    loss, _ = cosine_cross_entropy(img, leaf, scale, tasks, targets, class_task)
    loss.backward()
    assert leaf.grad is not None and not img.requires_grad


@pytest.mark.slow
def test_backward_is_deterministic(interpreter):
    batch = _batch()
    first, second = _run("auto", *batch)[2], _run("auto", *batch)[2]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_predict_entry(interpreter):
    img, txt, scale, tasks, _, class_task = _batch()
    assert torch.equal(within_task_predict(img, txt, scale, tasks, class_task, "auto"),
                       within_task_predict(img, txt, scale, tasks, class_task, "off"))


def test_unsorted_columns_take_the_torch_path(interpreter):
    img, txt, scale, tasks, targets, class_task = _batch()
    perm = torch.randperm(len(class_task))
    position = torch.empty_like(perm)
    position[perm] = torch.arange(len(perm))
    loss, pred, _ = _run("auto", img, txt[perm], scale, tasks, position[targets], class_task[perm])
    ref_loss, ref_pred, _ = _run("off", *_batch())
    assert torch.equal(perm[pred], ref_pred) and rel_err(loss, ref_loss) <= FP32_BOUND


@pytest.mark.parametrize("enabled", ["auto", "off"])
def test_bad_inputs_are_named(interpreter, enabled):
    img, txt, scale, tasks, targets, class_task = _batch()
    wrong = targets.clone()
    wrong[0] = (targets[0] + 200) % len(class_task) if int(tasks[0]) != 1 else 0
    with pytest.raises(ValueError, match="does not belong to its sample's task"):
        cosine_cross_entropy(img, txt, scale, tasks, wrong, class_task, enabled=enabled)
    with pytest.raises(ValueError, match="empty batch"):
        cosine_cross_entropy(img[:0], txt, scale, tasks[:0], targets[:0], class_task, enabled=enabled)
    with pytest.raises(ValueError, match="kernels.enabled"):
        cosine_cross_entropy(img, txt, scale, tasks, targets, class_task, enabled="on")


@requires_gpu
def test_bf16_on_gpu(gpu):
    """bf16 features (both): products in bf16 with fp32 accumulation, against the fp32 reference on the
    same rounded inputs. Bound 1e-2 relative for the loss and gradients; predictions may differ only
    where two logits are within bf16 rounding, so at most 2% of them."""
    img, txt, scale, tasks, targets, class_task = _batch(n=256, dim=768, device=gpu, dtype=torch.bfloat16)
    loss, pred, grads = _run("auto", img, txt, scale, tasks, targets, class_task)
    ref_loss, ref_pred, ref_grads = _run("off", img.float(), txt.float(), scale, tasks, targets, class_task)
    assert rel_err(loss, ref_loss) <= 1e-2
    assert float((pred != ref_pred).float().mean()) <= 0.02
    for g, r in zip(grads[:2], ref_grads[:2]):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) <= 1e-2
