"""Class-parallel scoring's share statistics, fused (``kernels/cosine_ce.py`` ``STATS``) against the PyTorch
path (``share_loss.share_logits`` + ``share_stats``), fp32 under the interpreter, on cloned inputs.

Global tasks of 1, 397, 5, 30 and 2 classes, embedding dimension 70 (no multiple of the chunk). Shares: part
of the 397-class task and of the 30-class one, with the 1-class task, none of the 5-class task (its samples
have no column: top -inf, sum 0, best 0) and many targets elsewhere (target 0); the whole 397-class task alone;
one column. Ties: a zero image feature (every logit 0) and two classes with the same cosine to a one-hot image
feature, in different column tiles (the first column wins, as ``torch.max``). Bounds: top, sum of exponentials,
target logit and the gradients of image features, share features and ``logit_scale`` (of a random combination
of the sums and target logits) within max|kernel - torch| / max|torch| <= 1e-5 (the kernel folds the norms in
after the dot product, the reference normalises first); -inf tops and best class ids equal.
On a GPU the dispatcher's own launch runs in fp32 and bf16 against the fp32 torch path.
"""

import pytest
import torch

from softcpt_dist.kernels.compile_check import DTYPES, TARGETS
from softcpt_dist.kernels.cosine_ce import fused_share_stats
from softcpt_dist.kernels.launch import LossLaunch, loss_launch
from softcpt_dist.model import share_loss
from softcpt_dist.model.loss import column_positions
from softcpt_dist.model.share_loss import ShareBatch, class_parallel_loss, share_statistics

from kernel_cases import rel_err, requires_gpu

SIZES = (1, 397, 5, 30, 2)
FP32_BOUND = 1e-5
CLASS_TASK = torch.cat([torch.full((k,), t) for t, k in enumerate(SIZES)])
FIRST = torch.tensor((0,) + SIZES).cumsum(0)  # each task's first class id
TIE = (int(FIRST[1]) + 3, int(FIRST[1]) + 40)  # two classes of the 397-class task with the same cosine
SHARES = {
    "split": torch.cat([torch.tensor([0]), torch.arange(1, 261), torch.arange(403, 420), torch.arange(433, 435)]),
    "whole 397": torch.arange(1, 398),
    "one column": torch.tensor([TIE[0]]),
}


def _batch(n=70, dim=70, seed=0):
    """Image features (sample 0 zero, sample 1 one-hot: the ties), tasks, global targets, class features."""
    g = torch.Generator().manual_seed(seed)
    tasks = torch.randint(0, len(SIZES), (n,), generator=g)
    tasks[:2] = 1
    targets = torch.stack([FIRST[t] + torch.randint(0, SIZES[t], (), generator=g) for t in tasks])
    img = torch.randn(n, dim, generator=g)
    img[0] = 0.0
    img[1] = 0.0
    img[1, 0] = 3.0
    txt = torch.randn(len(CLASS_TASK), dim, generator=g)
    txt[list(TIE)] = 0.0
    txt[TIE[0], :3] = torch.tensor([8.0, 1.0, 2.0])  # same norm, same first component: equal cosines to img[1]
    txt[TIE[1], :3] = torch.tensor([8.0, 2.0, 1.0])
    return img, txt, torch.tensor(4.6052), tasks, targets


def _stats(fused, img, txt, scale, tasks, targets, ids, launch=None, seed=1):
    """The statistics and the gradients of a random combination of the sums and target logits."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (img, txt[ids], scale)]
    if fused:
        local = column_positions(ids, len(CLASS_TASK))[targets]
        stats = fused_share_stats(*leaves, ids, CLASS_TASK[ids], tasks, local, launch=launch)
    else:
        stats = share_statistics(*leaves, ids, CLASS_TASK, tasks, targets, enabled="off")
    top, sum_exp, target, best = stats
    g = torch.Generator().manual_seed(seed)
    (sum_exp * torch.randn(len(tasks), generator=g) + target * torch.randn(len(tasks), generator=g)).sum().backward()
    return [s.detach() for s in stats], [t.grad for t in leaves]


def _check(fused, ref):
    (top, sum_exp, target, best), grads = fused
    (ref_top, ref_sum, ref_target, ref_best), ref_grads = ref
    finite = torch.isfinite(ref_top)
    assert torch.equal(torch.isfinite(top), finite)
    assert rel_err(top[finite], ref_top[finite]) <= FP32_BOUND
    assert rel_err(sum_exp, ref_sum) <= FP32_BOUND and torch.equal(sum_exp == 0, ref_sum == 0)
    assert rel_err(target, ref_target) <= FP32_BOUND and torch.equal(target == 0, ref_target == 0)
    assert torch.equal(best, ref_best)
    for name, g, r in zip(("image", "share", "logit_scale"), grads, ref_grads):
        assert rel_err(g, r) <= FP32_BOUND, name


@pytest.mark.parametrize("share", list(SHARES))
def test_matches_torch(interpreter, share):
    img, txt, scale, tasks, targets = _batch()
    ids = SHARES[share]
    fused, ref = _stats(True, img, txt, scale, tasks, targets, ids), _stats(False, img, txt, scale, tasks, targets, ids)
    _check(fused, ref)
    (top, sum_exp, target, best), _ = fused
    held = torch.isin(targets, ids)
    missing = ~torch.isin(tasks, CLASS_TASK[ids])
    assert bool((target[~held] == 0).all()) and bool((best[missing] == 0).all())
    assert bool((top[missing] == float("-inf")).all()) and bool((sum_exp[missing] == 0).all())
    if share != "one column":  # the cases are there: targets elsewhere, samples without a column, ties
        assert bool(held.any()) and bool((~held).any())
    if share == "split":
        assert bool(missing.any())
    if bool(torch.isin(torch.tensor(TIE), ids).all()):
        assert best[1] == TIE[0] and best[0] == ids[CLASS_TASK[ids] == 1][0]


def test_without_image_gradient(interpreter):
    """Cached image features (no gradient): the share's and ``logit_scale``'s gradients only."""
    img, txt, scale, tasks, targets = _batch()
    ids = SHARES["split"]
    leaf = txt[ids].clone().requires_grad_(True)
    _, sum_exp, target, _ = share_statistics(img, leaf, scale, ids, CLASS_TASK, tasks, targets)
    (sum_exp.sum() + target.sum()).backward()
    ref = txt[ids].clone().requires_grad_(True)
    _, ref_sum, ref_target, _ = share_statistics(img, ref, scale, ids, CLASS_TASK, tasks, targets, enabled="off")
    (ref_sum.sum() + ref_target.sum()).backward()
    assert rel_err(leaf.grad, ref.grad) <= FP32_BOUND


def _gpu_tiles(dim):
    """The (samples, classes, chunk) tiles a ``dim``-wide embedding gets on any GPU target and dtype."""
    return sorted({(lambda l: (l.samples, l.classes, l.chunk))(loss_launch(dtype, dim, target))
                   for target in TARGETS for dtype in DTYPES.values()})


@pytest.mark.slow
@pytest.mark.parametrize("tiles", sorted({t for dim in (512, 768) for t in _gpu_tiles(dim)}), ids=str)
def test_gpu_tiles_match_torch(interpreter, tiles):
    """The tiles a GPU launches, at dimension 70 on the split share."""
    img, txt, scale, tasks, targets = _batch()
    ids = SHARES["split"]
    _check(_stats(True, img, txt, scale, tasks, targets, ids, launch=LossLaunch(*tiles)),
           _stats(False, img, txt, scale, tasks, targets, ids))


def test_class_parallel_loss_fused_equals_torch(interpreter, monkeypatch):
    """One process (world size 1, its share every class): the loss, the share's and ``logit_scale``'s
    gradients and the predictions with ``enabled="auto"`` (fused) equal those with ``"off"``."""
    calls = []
    monkeypatch.setattr(share_loss, "fused_share_stats", lambda *a, **k: calls.append(1) or fused_share_stats(*a, **k))
    img, txt, scale, tasks, targets = _batch()
    ids = torch.arange(len(CLASS_TASK))
    weights = torch.rand(len(tasks), generator=torch.Generator().manual_seed(2))
    batch = ShareBatch(img, tasks, targets, weights, slice(0, len(tasks)))
    results = []
    for enabled in ("auto", "off"):
        share, leaf_scale = txt.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        loss, predicted = class_parallel_loss(share, ids, CLASS_TASK, batch, leaf_scale, enabled=enabled)
        loss.backward()
        results.append((loss.detach(), predicted, share.grad, leaf_scale.grad))
    (loss, predicted, grad, grad_scale), (ref_loss, ref_predicted, ref_grad, ref_grad_scale) = results
    assert len(calls) == 1 and torch.equal(predicted, ref_predicted)
    assert rel_err(loss, ref_loss) <= FP32_BOUND
    assert rel_err(grad, ref_grad) <= FP32_BOUND and rel_err(grad_scale, ref_grad_scale) <= FP32_BOUND


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_on_this_gpu(gpu, dtype):
    """The dispatcher's own launch for this GPU, features in ``dtype``, against the fp32 torch path on the same
    (rounded) inputs: fp32 within 1e-5 and best classes equal; bf16 within the bf16 loss tests' 1e-2 (its
    share gradient is bf16) and best classes differing on at most 2% of the samples."""
    img, txt, scale, tasks, targets = (t.to(gpu) for t in _batch(n=256, dim=768))
    ids, class_task = SHARES["split"].to(gpu), CLASS_TASK.to(gpu)
    results = []
    for enabled, cast in (("auto", dtype), ("off", torch.float32)):
        share = txt[ids].to(dtype).to(cast).requires_grad_(True)
        stats = share_statistics(img.to(dtype).to(cast), share, scale, ids, class_task, tasks, targets, enabled)
        (stats.sum_exp.sum() + stats.target.sum()).backward()
        results.append(([s.detach() for s in stats], share.grad))
    ((top, sum_exp, target, best), grad), ((ref_top, ref_sum, ref_target, ref_best), ref_grad) = results
    bound = FP32_BOUND if dtype == torch.float32 else 1e-2
    finite = torch.isfinite(ref_top)
    assert torch.equal(torch.isfinite(top), finite) and rel_err(top[finite], ref_top[finite]) <= bound
    assert rel_err(sum_exp, ref_sum) <= bound and rel_err(target, ref_target) <= bound
    assert grad.dtype == dtype and rel_err(grad, ref_grad) <= bound
    assert float((best != ref_best).float().mean()) <= (0.0 if dtype == torch.float32 else 0.02)
