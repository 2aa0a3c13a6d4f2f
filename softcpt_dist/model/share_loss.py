"""Class-parallel scoring: every rank scores the step's whole global batch against its own share of the classes.

With class-parallel text encoding each rank holds the features of a share of the classes. Gathering every
class feature to every rank moves classes × embedding per step, and their gradients back; the images of a
step are few and the classes many, so here the ranks gather the image features instead (global batch ×
embedding) and each scores every sample against its share. A sample's softmax over its own task's classes
then needs from each share only three numbers -- the largest logit among the task's columns there, the sum
of exponentials relative to it, and the target's logit where the share holds it -- plus the share's best
column for the prediction (as vocabulary-parallel cross-entropy does for language models): one gather
of a few numbers per sample. The gradient of a share's features is then complete on the rank that encoded
them: nothing is reduced back. Both gathers (images, statistics) are all-reduces of zero-filled buffers
(``distributed.gather_by_sum``): on many nodes NCCL runs these small tensors as trees, whose latency
grows as the log of the node count, not as the ring's W - 1 hops.

The loss is the one the gathered path trains with: each sample's cross-entropy over its task's classes,
times its task weight, over its rank's micro-batch size, averaged over ranks (the global batch mean when the
micro-batches are equal); a method's per-class loss term (``Method.class_loss_terms``) enters with each
class's weight in that average. Every rank computes it alike; its gradient reaches a share's features on
the share's owner only, so each rank's gradient is its share's part of the whole. DeepSpeed averages the
ranks' gradients (their sum over W), so the statistics' backward multiplies by W.

The statistics come from the dispatcher ``share_statistics``: the fused kernel (``kernels/cosine_ce.py``,
no batch x share logits in memory) where Triton runs, else ``share_logits`` + ``share_stats``, the reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from softcpt_dist import distributed as D
from softcpt_dist.kernels.cosine_ce import fused_applies, fused_share_stats
from softcpt_dist.model.batch_invariance import MIN_ROWS
from softcpt_dist.model.loss import column_positions, cosine_logits

NEG_INF = float("-inf")


class ShareBatch(NamedTuple):
    """The step's global batch, every rank's micro-batch in rank order: image features ``[B, E]``, each
    sample's task and target class (global class ids) ``[B]``, its weight in the loss ``[B]``
    (task weight / (world size × its micro-batch size)), and where this rank's samples are (``rows``)."""

    image_features: torch.Tensor
    tasks: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    rows: slice


class ShareStats(NamedTuple):
    """Per sample of the global batch, over one share's columns of the sample's task: the largest logit
    (-inf without such a column), the sum of exponentials relative to it, the target's logit (0 where the
    share lacks the target), and the share's best column (a global class id; 0 without a column)."""

    top: torch.Tensor
    sum_exp: torch.Tensor
    target: torch.Tensor
    best: torch.Tensor


def share_logits(image_features: torch.Tensor, features: torch.Tensor, logit_scale: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, C_s]`` cosine logits against a share, in ``dtype`` (``cosine_logits``); the share is padded to
    ``MIN_ROWS`` classes (rows of ones: a zero row has no direction, NaN in fp16) so that each logit is computed
    by the same BLAS kernel whatever the share's size (``batch_invariance``)."""
    classes = features.shape[0]
    if classes < MIN_ROWS:
        features = torch.cat([features, features.new_ones(MIN_ROWS - classes, features.shape[1])])
    return cosine_logits(image_features, features, logit_scale, dtype)[:, :classes]  # its image rows padded too


def relative_exp(masked: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``exp(masked - top)`` row by row (``masked [B, C_s]`` with -inf outside the sample's task, ``top [B]`` its
    rows' largest, without gradient): 0 outside the task, and a row without a column of it (``top`` -inf) all 0."""
    return torch.exp(masked - torch.where(torch.isfinite(top), top, torch.zeros_like(top)).unsqueeze(1))


def share_stats(logits: torch.Tensor, class_ids: torch.Tensor, class_task: torch.Tensor,
                tasks: torch.Tensor, targets: torch.Tensor) -> ShareStats:
    """The statistics of one share (``logits [B, C_s]`` of the global classes ``class_ids``, whose tasks are
    ``class_task``) for samples of ``tasks`` and ``targets``."""
    own = class_task.unsqueeze(0) == tasks.unsqueeze(1)
    masked = logits.masked_fill(~own, NEG_INF)
    with torch.no_grad():
        top, column = masked.max(dim=1)  # a share has at least one column (a stand-in's, where empty)
        best = torch.where(torch.isfinite(top), class_ids[column], torch.zeros_like(column))
    sum_exp = relative_exp(masked, top).sum(dim=1)
    target = (logits * (class_ids.unsqueeze(0) == targets.unsqueeze(1))).sum(dim=1)
    return ShareStats(top, sum_exp, target, best)


def share_statistics(image_features: torch.Tensor, share_features: torch.Tensor, logit_scale: torch.Tensor,
                     class_ids: torch.Tensor, class_task: torch.Tensor, tasks: torch.Tensor, targets: torch.Tensor,
                     enabled: str = "auto") -> ShareStats:
    """Dispatcher: the statistics of the share ``share_features`` (the global classes ``class_ids``, ascending;
    ``class_task [C]``: every class's task) for samples of ``tasks`` and global ``targets``, each target inside
    its sample's task. Fused (``fused_share_stats``) where ``kernels.enabled`` and the tensors allow and the
    share's columns are ordered by task (ascending ids of task-ordered classes are); else ``share_stats`` of
    ``share_logits``. The fused path needs no padding to ``MIN_ROWS``: each logit is computed alike
    whatever the share's size."""
    share_task = class_task[class_ids]
    if len(tasks) and fused_applies(enabled, image_features, share_features, logit_scale, tasks, share_task):
        local_targets = column_positions(class_ids, len(class_task))[targets]
        return ShareStats(*fused_share_stats(image_features, share_features, logit_scale, class_ids, share_task,
                                             tasks, local_targets))
    logits = share_logits(image_features, share_features, logit_scale)
    return share_stats(logits, class_ids, share_task, tasks, targets)


def rescale(top: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``exp(top - high)`` per share ``[W, B]``, 0 where a share has no column of the sample's task (``top``
    -inf): what moves each share's sums, taken relative to its own largest logit, to the overall one."""
    return torch.exp(torch.where(torch.isfinite(top), top - high, torch.full_like(top, NEG_INF)))


def merged_log_sum_exp(top: torch.Tensor, sum_exp: torch.Tensor) -> torch.Tensor:
    """``[B]``: the log-sum-exp over every share's columns from each share's largest value ``top [W, B]`` and its
    sum of exponentials relative to it ``sum_exp [W, B]``."""
    high = top.max(dim=0).values
    return torch.log((sum_exp * rescale(top, high)).sum(dim=0)) + high


def combine(top: torch.Tensor, sum_exp: torch.Tensor, target: torch.Tensor, best: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every share's statistics ``[W, B]`` -> each sample's cross-entropy over its task ``[B]`` and its
    predicted global class (the largest logit over shares; the lowest class id on a tie)."""
    loss = merged_log_sum_exp(top, sum_exp) - target.sum(dim=0)
    with torch.no_grad():
        high = top.max(dim=0).values
        tied = torch.where(top == high, best, torch.full_like(best, torch.iinfo(best.dtype).max))
        predicted = tied.min(dim=0).values
    return loss, predicted


class ShareScores(NamedTuple):
    """``class_parallel_scores``: the global batch's loss, this rank's samples' predicted global classes, and
    every rank's ``extra`` statistics ``[W, k, B]`` (None without them)."""

    loss: torch.Tensor
    predicted: torch.Tensor
    extra: Optional[torch.Tensor]


def class_parallel_loss(share_features: torch.Tensor, class_ids: torch.Tensor, class_task: torch.Tensor,
                        batch: ShareBatch, logit_scale: torch.Tensor, contributes: bool = True,
                        class_terms: Optional[torch.Tensor] = None, enabled: str = "auto"
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, predictions)``: the global batch's loss (the same on every rank) and each of this rank's
    samples' predicted global class, from this rank's share (``share_features [C_s, E]`` of the global
    classes ``class_ids``; ``class_task [C]``: every class's task). ``contributes=False``: the share is a
    stand-in (ZeRO-3 runs every rank's forward and backward) that contributes nothing and gets a zero
    gradient. ``class_terms``: the share's classes' weighted loss terms, summed into the loss. ``enabled``:
    ``kernels.enabled``, whether the statistics may run fused (``share_statistics``)."""
    scores = class_parallel_scores(share_features, class_ids, class_task, batch, logit_scale, contributes,
                                   class_terms, enabled)
    return scores.loss, scores.predicted


def class_parallel_scores(share_features: torch.Tensor, class_ids: torch.Tensor, class_task: torch.Tensor,
                          batch: ShareBatch, logit_scale: torch.Tensor, contributes: bool = True,
                          class_terms: Optional[torch.Tensor] = None, enabled: str = "auto",
                          logits: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None
                          ) -> ShareScores:
    """``class_parallel_loss``, plus what a method scoring more than the cross-entropy needs (ProGrad's guide
    loss): ``logits``, the share's logits ``[B, C_s]`` when the caller has them (the statistics then come
    from them, in fp32: fp16 logits of ``model.precision=official_fp16`` are rounded as the official code's,
    their softmax statistics taken in fp32), and ``extra``, per-sample statistics of this share ``[k, B]`` carried in the same gather
    (with the same gradient rule: each rank's backward reaches its own slot, times W). A stand-in share's
    ``extra`` must already be neutral (whatever contributes nothing to the caller's merge): only the loss's
    statistics are neutralised here."""
    if len(class_task) >= 2**24:
        raise ValueError(f"{len(class_task)} classes: class-parallel scoring carries class ids in fp32 (below 2**24)")
    if logits is None:
        stats = share_statistics(batch.image_features, share_features, logit_scale, class_ids, class_task,
                                 batch.tasks, batch.targets, enabled)
    else:
        stats = share_stats(logits.float(), class_ids, class_task[class_ids], batch.tasks, batch.targets)
    term = class_terms.sum() if class_terms is not None else stats.sum_exp.new_zeros(())
    if not contributes:  # the stand-in: joins the graph with exact zeros
        stats = ShareStats(torch.full_like(stats.top, NEG_INF), stats.sum_exp * 0, stats.target * 0,
                           torch.zeros_like(stats.best))
        term = term * 0
    n = len(stats.top)
    # One gather of fp32 numbers (an all-reduce, ``D.gather_by_sum``); class ids below 2**24 are exact in fp32.
    parts = [stats.top.float(), stats.sum_exp.float(), stats.target.float(), stats.best.float()]
    if extra is not None:
        parts += list(extra.float().unbind(0))
    packed = torch.cat([*parts, term.reshape(1).float()])
    gathered = D.gather_own_gradient(packed, scale=float(D.world_size()))
    top, sum_exp, target, best = (gathered[:, i * n:(i + 1) * n] for i in range(4))
    terms = gathered[:, -1]
    best = best.long()
    per_sample, predicted = combine(top, sum_exp, target, best)
    loss = (per_sample * batch.weights).sum() + terms.sum()
    gathered_extra = None if extra is None else gathered[:, 4 * n:-1].reshape(len(gathered), len(extra), n)
    return ShareScores(loss, predicted[batch.rows], gathered_extra)
