"""Class-parallel scoring (``share_loss.py``): the loss, the gradient of every share's features and the
predictions equal the gathered path's -- on one rank and over ranks whose shares split a task, miss a
sample's task entirely, or hold nothing (a stand-in) -- with per-task weights, a per-class loss term and
micro-batches of different sizes."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from softcpt_dist.model.loss import cosine_logits, multitask_cross_entropy, within_task_argmax
from softcpt_dist.model.share_loss import (ShareBatch, class_parallel_loss, class_parallel_scores, combine,
                                           share_logits, share_stats)

# fp32 rounding: the statistics are summed in another order than log_softmax's (measured below 5e-7)
ATOL = 2e-6

CLASS_TASK = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
# Rank 0 holds task 0 and part of task 2, rank 1 the rest of task 2 and task 1, rank 2 nothing (a stand-in),
# rank 3 task 3: samples of tasks 0 and 1 find no column of theirs on ranks 2 and 3.
SHARES = [[0, 1, 2, 5], [3, 4, 6, 7, 8], [], [9, 10]]
SIZES = [3, 4, 2, 1]  # each rank's micro-batch
TASK_WEIGHTS = torch.tensor([1.0, 0.5, 2.0, 1.5])


def _data():
    torch.manual_seed(0)
    n, e, b = len(CLASS_TASK), 8, sum(SIZES)
    feats = torch.randn(n, e)
    images = torch.randn(b, e)
    tasks = torch.randint(0, 4, (b,))
    targets = torch.stack([torch.nonzero(CLASS_TASK == t).flatten()[torch.randint(0, int((CLASS_TASK == t).sum()), ())]
                           for t in tasks])
    hand = torch.randn(n, e)  # a per-class term: (1 - cos) to a fixed feature, weighted per class
    class_weight = torch.rand(n)
    return feats, images, tasks, targets, hand, class_weight


def _terms(feats, hand, ids):
    return 1.0 - torch.nn.functional.cosine_similarity(feats, hand[ids], dim=1)


def _reference(scale):
    """The gathered path: each rank's micro-batch mean against every class, averaged over ranks."""
    feats, images, tasks, targets, hand, class_weight = _data()
    feats.requires_grad_(True)
    logits = cosine_logits(images, feats, scale)
    loss, start = 0.0, 0
    for b in SIZES:
        rows = slice(start, start + b)
        loss = loss + multitask_cross_entropy(logits[rows], tasks[rows], targets[rows], CLASS_TASK, TASK_WEIGHTS)
        start += b
    loss = loss / len(SIZES) + (_terms(feats, hand, torch.arange(len(feats))) * class_weight).sum()
    loss.backward()
    return loss.detach(), feats.grad, within_task_argmax(logits.detach(), tasks, CLASS_TASK)


def test_one_rank_scores_as_the_gathered_path():
    scale = torch.tensor(3.0)
    feats, images, tasks, targets, hand, class_weight = _data()
    feats.requires_grad_(True)
    weights = TASK_WEIGHTS[tasks] / len(tasks)
    batch = ShareBatch(images, tasks, targets, weights, slice(0, len(tasks)))
    ids = torch.arange(len(feats))
    loss, predicted = class_parallel_loss(feats, ids, CLASS_TASK, batch, scale,
                                          class_terms=_terms(feats, hand, ids) * class_weight)
    loss.backward()
    ref = feats.detach().clone().requires_grad_(True)
    logits = cosine_logits(images, ref, scale)
    ref_loss = multitask_cross_entropy(logits, tasks, targets, CLASS_TASK, TASK_WEIGHTS) \
        + (_terms(ref, hand, ids) * class_weight).sum()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(feats.grad, ref.grad, rtol=0, atol=ATOL)
    assert torch.equal(predicted, within_task_argmax(logits.detach(), tasks, CLASS_TASK))


def test_fp16_logits_score_as_the_official_fp16_loss():
    """``model.precision=official_fp16``: the shares' statistics are taken in fp32 from fp16 logits rounded as
    the official code's; the loss and the features' gradient equal the fp16 cross-entropy within fp16
    rounding (2^-10 relative)."""
    scale = torch.tensor(3.0)
    feats, images, tasks, targets, _, _ = _data()
    feats = feats.half().requires_grad_(True)
    weights = TASK_WEIGHTS[tasks] / len(tasks)
    batch = ShareBatch(images.half(), tasks, targets, weights, slice(0, len(tasks)))
    ids = torch.arange(len(feats))
    logits = share_logits(images.half(), feats, scale, torch.float16)
    assert logits.dtype == torch.float16
    scores = class_parallel_scores(feats, ids, CLASS_TASK, batch, scale, logits=logits)
    scores.loss.backward()
    ref = feats.detach().clone().requires_grad_(True)
    ref_logits = cosine_logits(images.half(), ref, scale, torch.float16)
    assert torch.equal(ref_logits, logits.detach())  # the same fp16 rounding of every logit
    ref_loss = multitask_cross_entropy(ref_logits, tasks, targets, CLASS_TASK, TASK_WEIGHTS)
    ref_loss.backward()
    assert feats.grad.dtype == torch.float16
    torch.testing.assert_close(scores.loss, ref_loss.float(), rtol=2**-10, atol=0)
    torch.testing.assert_close(feats.grad.float(), ref.grad.float(), rtol=2**-9, atol=2**-9 * float(ref.grad.abs().max()))
    assert torch.equal(scores.predicted, within_task_argmax(ref_logits.detach(), tasks, CLASS_TASK))


def test_statistics_of_a_share_without_a_samples_task_are_empty():
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    stats = share_stats(logits, torch.tensor([3, 4]), torch.tensor([1, 1]), torch.tensor([0, 1]),
                        torch.tensor([0, 4]))
    assert stats.top[0] == float("-inf") and stats.sum_exp[0] == 0 and stats.target[0] == 0
    assert stats.top[1] == 0.5 and stats.best[1] == 3 and stats.target[1] == -1.0
    torch.testing.assert_close(stats.sum_exp[1], 1 + torch.exp(torch.tensor(-1.5)))


def test_combining_shares_gives_the_softmax_over_the_whole_task_and_its_first_best_class():
    logits = torch.tensor([2.0, 0.5, 2.0, -1.0])  # one sample's task, its classes 0..3 over two shares
    top = torch.tensor([[2.0], [2.0]])
    sum_exp = torch.stack([torch.exp(logits[:2] - 2).sum(), torch.exp(logits[2:] - 2).sum()]).view(2, 1)
    target = torch.tensor([[0.0], [-1.0]])  # the target is class 3, on the second share
    loss, predicted = combine(top, sum_exp, target, torch.tensor([[5], [2]]))
    torch.testing.assert_close(loss, -torch.log_softmax(logits, 0)[3:], rtol=0, atol=1e-6)
    assert predicted.tolist() == [2]  # tied logits: the lower class id


def _worker(rank, world, port, scale, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from softcpt_dist.model.class_shards import ClassShards

    feats, images, tasks, targets, hand, class_weight = _data()
    feats.requires_grad_(True)
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    shards = ClassShards(world, rank)
    batch = shards.gather_batch(images[rows], tasks[rows], targets[rows], SIZES, TASK_WEIGHTS)
    contributes = bool(SHARES[rank])
    ids = torch.tensor(SHARES[rank] or [0])  # the stand-in encodes one class and contributes nothing
    share = feats[ids]
    loss, predicted = class_parallel_loss(share, ids, CLASS_TASK, batch, torch.tensor(scale), contributes,
                                          _terms(share, hand, ids) * class_weight[ids])
    loss.backward()
    grad = feats.grad.clone()
    dist.all_reduce(grad)
    queue.put((rank, loss.item(), (grad / world).tolist(), predicted.tolist(),
               shards.image_bytes))  # averaged over ranks, as DeepSpeed does
    dist.destroy_process_group()


def test_shares_over_four_ranks_score_as_the_gathered_path():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scale, world = 3.0, len(SHARES)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scale, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {r[0]: r[1:] for r in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref_loss, ref_grad, ref_pred = _reference(torch.tensor(scale))
    start = 0
    for rank in range(world):
        loss, grad, predicted, image_bytes = results[rank]
        assert abs(loss - ref_loss.item()) <= ATOL, rank
        torch.testing.assert_close(torch.tensor(grad), ref_grad, rtol=0, atol=ATOL)
        assert predicted == ref_pred[start:start + SIZES[rank]].tolist(), rank
        assert image_bytes == 2 * (world - 1) * max(SIZES) * (8 + 2) * 4  # all-reduce traffic of [W, max, E + 2]
        start += SIZES[rank]
