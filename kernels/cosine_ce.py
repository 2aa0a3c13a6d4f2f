"""Cosine logits and the per-task softmax cross-entropy, fused: no batch x classes matrix in memory.

A sample is scored only on its own task's columns, a contiguous range ``[start, end)`` when the
columns are ordered by task (as every task group's are). Samples are sorted by task, so a tile of
samples needs only the union of its few tasks' ranges, and a tile of classes only the samples of
its tasks. Each program recomputes the scaled cosines of its tile over the embedding dimension
(L2 norms folded in: ``exp(logit_scale) * (x . w) / (|x| |w|)``) and keeps an online
log-sum-exp, the target's logit and the within-task argmax:

- forward, per sample tile: per-sample loss, log-sum-exp and prediction (``predict`` is this
  without targets);
- backward, per sample tile and embedding chunk: the image-feature gradient (only when image
  features require it; cached features do not); per class tile and chunk: the class-feature gradient
  and each class's share of the ``logit_scale`` gradient. Each output has one writer: deterministic.

The same two kernels (``STATS``) give class-parallel scoring's statistics of one class share
(``fused_share_stats``): per sample, over the share's columns of its task, the top logit, the sum of
exponentials relative to it, the target's logit and the best column -- the online max, sum, target and
argmax above, written instead of being turned into a loss. Their backward is the loss's with
``dlogit = g_sum * exp(logit - top) + g_target * onehot(target)`` in place of the softmax's.

The kernels take plain tensors; the model's dispatchers (``softcpt_dist.model.loss.cosine_cross_entropy``
and ``within_task_predict``, ``softcpt_dist.model.share_loss.share_statistics``) decide when to call them,
and its PyTorch path (``cosine_logits``, ``multitask_cross_entropy``, ``within_task_argmax``;
``share_logits`` + ``share_stats``) is the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from softcpt_dist.kernels._triton import dot_precision, kernel, tl, use_triton
from softcpt_dist.kernels.launch import LossLaunch, device_target, loss_launch


@kernel
def _sample_tile(IMG, TXT, ORDER, COL_START, COL_END, TARGET, WEIGHT, SCALE, LOSS, LSE, PRED, SUM_EXP, GRAD_LOSS,
                 GRAD_PICKED, GRAD_IMG, n_samples, dim, stride_img, stride_txt, HAS_TARGET: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, BACKWARD: tl.constexpr, STATS: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
    """A tile of samples (task-sorted): forward loss, log-sum-exp and prediction, or (``BACKWARD``) one
    embedding chunk of the image-feature gradient. ``STATS`` (share statistics): the forward writes the
    top logit to ``LSE``, the sum of exponentials relative to it to ``SUM_EXP`` and the target's logit to
    ``LOSS``; the backward takes their gradients in ``GRAD_LOSS`` (the sum's) and ``GRAD_PICKED``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = i < n_samples
    sample = tl.load(ORDER + i, mask=row_ok, other=0)
    start = tl.load(COL_START + sample, mask=row_ok, other=0)
    end = tl.load(COL_END + sample, mask=row_ok, other=0)
    scale = tl.exp(tl.load(SCALE).to(tl.float32))
    sq = tl.zeros([BLOCK_B], tl.float32)
    for e0 in range(0, dim, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        x = tl.load(IMG + sample[:, None] * stride_img + e[None, :], mask=row_ok[:, None] & (e < dim)[None, :],
                    other=0.0).to(tl.float32)
        sq += tl.sum(x * x, 1)
    r_img = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)  # F.normalize's eps
    if HAS_TARGET:
        target = tl.load(TARGET + sample, mask=row_ok, other=-1)
    if HAS_WEIGHT:
        weight = tl.load(WEIGHT + sample, mask=row_ok, other=0.0)
    else:
        weight = tl.full([BLOCK_B], 1.0, tl.float32)
    if BACKWARD:
        lse = tl.load(LSE + sample, mask=row_ok, other=0.0)
        g = tl.load(GRAD_LOSS + sample, mask=row_ok, other=0.0) * weight
        if STATS:
            g_picked = tl.load(GRAD_PICKED + sample, mask=row_ok, other=0.0)
        chunk = tl.program_id(1).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
        acc = tl.zeros([BLOCK_B, BLOCK_E], tl.float32)
        h = tl.zeros([BLOCK_B], tl.float32)
    m_i = tl.full([BLOCK_B], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_B], tl.float32)
    picked = tl.zeros([BLOCK_B], tl.float32)
    best = tl.full([BLOCK_B], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK_B], tl.int64)
    lo = tl.min(tl.where(row_ok, start, 1 << 62), 0)
    hi = tl.max(tl.where(row_ok, end, 0), 0)
    for c0 in range(lo, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        dot = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        tsq = tl.zeros([BLOCK_C], tl.float32)
        for e0 in range(0, dim, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            x = tl.load(IMG + sample[:, None] * stride_img + e[None, :], mask=row_ok[:, None] & (e < dim)[None, :],
                        other=0.0)
            w = tl.load(TXT + cols[:, None] * stride_txt + e[None, :], mask=(cols < hi)[:, None] & (e < dim)[None, :],
                        other=0.0)
            dot += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            wf = w.to(tl.float32)
            tsq += tl.sum(wf * wf, 1)
        r_txt = 1.0 / tl.maximum(tl.sqrt(tsq), 1e-12)
        logit = scale * dot * r_img[:, None] * r_txt[None, :]
        valid = row_ok[:, None] & (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
        if BACKWARD:
            if STATS:  # d sum_exp / d logit = exp(logit - top), d target / d logit = onehot
                p = tl.exp(logit - lse[:, None]) * g[:, None]
                dlogit = tl.where(valid, p + tl.where(cols[None, :] == target[:, None], g_picked[:, None], 0.0), 0.0)
            else:
                p = tl.exp(logit - lse[:, None])
                if HAS_TARGET:
                    p = p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
                dlogit = tl.where(valid, p * g[:, None], 0.0)
            h += tl.sum(dlogit * logit, 1)
            w = tl.load(TXT + cols[:, None] * stride_txt + chunk[None, :],
                        mask=(cols < hi)[:, None] & (chunk < dim)[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(dlogit * r_txt[None, :], w, input_precision="ieee")
        else:
            masked = tl.where(valid, logit, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(masked, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(masked - m_new[:, None]), 1)
            m_i = m_new
            if HAS_TARGET:
                picked += tl.sum(tl.where(valid & (cols[None, :] == target[:, None]), logit, 0.0), 1)
            block_best = tl.max(masked, 1)
            block_col = c0 + tl.argmax(masked, 1, tie_break_left=True).to(tl.int64)
            better = block_best > best  # strictly: the first maximal column wins, as torch.argmax picks
            best_col = tl.where(better, block_col, best_col)
            best = tl.where(better, block_best, best)
    if BACKWARD:
        x = tl.load(IMG + sample[:, None] * stride_img + chunk[None, :], mask=row_ok[:, None] & (chunk < dim)[None, :],
                    other=0.0).to(tl.float32)
        grad = r_img[:, None] * (scale * acc - (r_img * h)[:, None] * x)
        tl.store(GRAD_IMG + sample[:, None] * stride_img + chunk[None, :], grad.to(GRAD_IMG.dtype.element_ty),
                 mask=row_ok[:, None] & (chunk < dim)[None, :])
    else:
        tl.store(PRED + sample, best_col, mask=row_ok)
        if STATS:  # a sample without a column of its task here: top -inf, sum 0, target 0
            tl.store(LSE + sample, tl.where(end > start, m_i, float("-inf")), mask=row_ok)
            tl.store(SUM_EXP + sample, l_i, mask=row_ok)
            tl.store(LOSS + sample, picked, mask=row_ok)
        elif HAS_TARGET:
            lse_out = m_i + tl.log(tl.where(row_ok, l_i, 1.0))
            tl.store(LSE + sample, lse_out, mask=row_ok)
            tl.store(LOSS + sample, weight * (lse_out - picked), mask=row_ok)


@kernel
def _class_tile(IMG, TXT, ORDER, COL_START, COL_END, SAMPLE_START, SAMPLE_END, TARGET, WEIGHT, SCALE, LSE,
                GRAD_LOSS, GRAD_PICKED, GRAD_TXT, H, n_samples, n_classes, dim, stride_img, stride_txt,
                HAS_WEIGHT: tl.constexpr, STATS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
    """One embedding chunk of the class-feature gradient of a tile of classes, from their tasks' samples;
    chunk 0 also writes each class's sum of dlogit * logit (its share of the logit_scale gradient).
    ``STATS``: of the share statistics (``LSE``: each sample's top logit; ``_sample_tile``'s gradients)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_classes
    chunk = tl.program_id(1).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    scale = tl.exp(tl.load(SCALE).to(tl.float32))
    lo = tl.min(tl.where(col_ok, tl.load(SAMPLE_START + cols, mask=col_ok, other=0), 1 << 62), 0)
    hi = tl.max(tl.where(col_ok, tl.load(SAMPLE_END + cols, mask=col_ok, other=0), 0), 0)
    acc = tl.zeros([BLOCK_C, BLOCK_E], tl.float32)
    h = tl.zeros([BLOCK_C], tl.float32)
    tsq = tl.zeros([BLOCK_C], tl.float32)
    for e0 in range(0, dim, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        w = tl.load(TXT + cols[:, None] * stride_txt + e[None, :], mask=col_ok[:, None] & (e < dim)[None, :],
                    other=0.0).to(tl.float32)
        tsq += tl.sum(w * w, 1)
    r_txt = 1.0 / tl.maximum(tl.sqrt(tsq), 1e-12)
    for i0 in range(lo, hi, BLOCK_B):
        i = i0 + tl.arange(0, BLOCK_B)
        row_ok = i < hi
        sample = tl.load(ORDER + i, mask=row_ok, other=0)
        start = tl.load(COL_START + sample, mask=row_ok, other=0)
        end = tl.load(COL_END + sample, mask=row_ok, other=0)
        target = tl.load(TARGET + sample, mask=row_ok, other=-1)
        lse = tl.load(LSE + sample, mask=row_ok, other=0.0)
        g = tl.load(GRAD_LOSS + sample, mask=row_ok, other=0.0)
        if HAS_WEIGHT:
            g = g * tl.load(WEIGHT + sample, mask=row_ok, other=0.0)
        dot = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        sq = tl.zeros([BLOCK_B], tl.float32)
        for e0 in range(0, dim, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            x = tl.load(IMG + sample[:, None] * stride_img + e[None, :], mask=row_ok[:, None] & (e < dim)[None, :],
                        other=0.0)
            w = tl.load(TXT + cols[:, None] * stride_txt + e[None, :], mask=col_ok[:, None] & (e < dim)[None, :],
                        other=0.0)
            dot += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            xf = x.to(tl.float32)
            sq += tl.sum(xf * xf, 1)
        r_img = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
        logit = scale * dot * r_img[:, None] * r_txt[None, :]
        valid = row_ok[:, None] & col_ok[None, :] & (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
        if STATS:
            g_picked = tl.load(GRAD_PICKED + sample, mask=row_ok, other=0.0)
            p = tl.exp(logit - lse[:, None]) * g[:, None]
            dlogit = tl.where(valid, p + tl.where(cols[None, :] == target[:, None], g_picked[:, None], 0.0), 0.0)
        else:
            p = tl.exp(logit - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
            dlogit = tl.where(valid, p * g[:, None], 0.0)  # [BLOCK_B, BLOCK_C]
        h += tl.sum(dlogit * logit, 0)
        x = tl.load(IMG + sample[:, None] * stride_img + chunk[None, :], mask=row_ok[:, None] & (chunk < dim)[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(dlogit * r_img[:, None]), x, input_precision="ieee")
    w = tl.load(TXT + cols[:, None] * stride_txt + chunk[None, :], mask=col_ok[:, None] & (chunk < dim)[None, :],
                other=0.0).to(tl.float32)
    grad = r_txt[:, None] * (scale * acc - (r_txt * h)[:, None] * w)
    tl.store(GRAD_TXT + cols[:, None] * stride_txt + chunk[None, :], grad.to(GRAD_TXT.dtype.element_ty),
             mask=col_ok[:, None] & (chunk < dim)[None, :])
    if tl.program_id(1) == 0:
        tl.store(H + cols, h, mask=col_ok)


def _tiles(tasks: torch.Tensor, class_task: torch.Tensor):
    """Task-sorted sample order, each sample's column range and each class's range of sorted samples."""
    order = torch.sort(tasks, stable=True).indices
    sorted_tasks = tasks[order].contiguous()
    col_start = torch.searchsorted(class_task, tasks, right=False)
    col_end = torch.searchsorted(class_task, tasks, right=True)
    sample_start = torch.searchsorted(sorted_tasks, class_task, right=False)
    sample_end = torch.searchsorted(sorted_tasks, class_task, right=True)
    return order, col_start, col_end, sample_start, sample_end


def _launch(img: torch.Tensor, launch: Optional[LossLaunch]) -> LossLaunch:
    return launch if launch is not None else loss_launch(img.dtype, img.shape[1], device_target(img.device))


def _meta(launch: LossLaunch, dtype: torch.dtype) -> dict:
    """The constexprs and options every loss kernel takes from a launch."""
    return dict(BLOCK_B=launch.samples, BLOCK_C=launch.classes, BLOCK_E=launch.chunk, PRECISION=dot_precision(dtype),
                **launch.options())


def _save(ctx, launch: LossLaunch, img, txt, logit_scale, targets, weight, lse, tiles) -> None:
    """What ``_backward`` reads: the inputs, each sample's shift (log-sum-exp; the statistics' top) and tiles."""
    ctx.save_for_backward(img, txt, logit_scale, targets, lse, *tiles, *([] if weight is None else [weight]))
    ctx.has_weight, ctx.launch = weight is not None, launch


def _backward(ctx, grad_loss: torch.Tensor, grad_picked: Optional[torch.Tensor] = None):
    """The image-feature, class-feature and ``logit_scale`` gradients, of the loss (``grad_loss``: per
    sample) or, with ``grad_picked``, of the share statistics (``grad_loss``: of the sums of exponentials,
    ``grad_picked``: of the target logits)."""
    img, txt, logit_scale, targets, lse, order, col_start, col_end, sample_start, sample_end, *weight = \
        ctx.saved_tensors
    grad_loss = grad_loss.contiguous().float()
    stats = grad_picked is not None
    grad_picked = grad_picked.contiguous().float() if stats else grad_loss
    weight = weight[0] if weight else lse
    n, dim = img.shape
    launch = ctx.launch
    chunks = -(-dim // launch.chunk)
    common = dict(HAS_WEIGHT=ctx.has_weight, STATS=stats, **_meta(launch, img.dtype))
    need_img, need_txt, need_scale = ctx.needs_input_grad[:3]
    grad_img = grad_txt = grad_scale = None
    if need_img:
        grad_img = torch.empty_like(img)
        _sample_tile[(-(-n // launch.samples), chunks)](
            img, txt, order, col_start, col_end, targets, weight, logit_scale, lse, lse, lse, lse, grad_loss,
            grad_picked, grad_img, n, dim, img.stride(0), txt.stride(0), HAS_TARGET=True, BACKWARD=True, **common)
    if need_txt or need_scale:
        grad_txt = torch.empty_like(txt)
        h = torch.empty(txt.shape[0], dtype=torch.float32, device=txt.device)
        _class_tile[(-(-txt.shape[0] // launch.classes), chunks)](
            img, txt, order, col_start, col_end, sample_start, sample_end, targets, weight, logit_scale, lse,
            grad_loss, grad_picked, grad_txt, h, n, txt.shape[0], dim, img.stride(0), txt.stride(0), **common)
        grad_scale = h.sum().to(logit_scale.dtype).reshape(logit_scale.shape) if need_scale else None
        grad_txt = grad_txt if need_txt else None
    return grad_img, grad_txt, grad_scale


class _CosineCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, logit_scale, tasks, targets, class_task, weight, launch):
        img, txt = img.contiguous(), txt.contiguous()
        n, dim = img.shape
        meta = _meta(launch, img.dtype)
        tiles = _tiles(tasks, class_task)
        order, col_start, col_end = tiles[:3]
        loss = torch.empty(n, dtype=torch.float32, device=img.device)
        lse = torch.empty_like(loss)
        pred = torch.empty(n, dtype=torch.long, device=img.device)
        weight_arg = weight if weight is not None else loss
        _sample_tile[(-(-n // launch.samples), 1)](
            img, txt, order, col_start, col_end, targets, weight_arg, logit_scale, loss, lse, pred, loss, loss, loss,
            img, n, dim, img.stride(0), txt.stride(0), HAS_TARGET=True, HAS_WEIGHT=weight is not None,
            BACKWARD=False, STATS=False, **meta)
        _save(ctx, launch, img, txt, logit_scale, targets, weight, lse, tiles)
        ctx.mark_non_differentiable(pred)
        return loss, pred

    @staticmethod
    def backward(ctx, grad_loss, _grad_pred):
        return (*_backward(ctx, grad_loss), None, None, None, None, None)


class _ShareStats(torch.autograd.Function):
    """Per sample, over its task's columns: top logit, sum of exponentials relative to it, target logit
    (``targets``: columns, -1 where absent) and best column. Differentiable: the sum and the target logit."""

    @staticmethod
    def forward(ctx, img, txt, logit_scale, tasks, targets, class_task, launch):
        img, txt = img.contiguous(), txt.contiguous()
        n, dim = img.shape
        tiles = _tiles(tasks, class_task)
        order, col_start, col_end = tiles[:3]
        top = torch.empty(n, dtype=torch.float32, device=img.device)
        sum_exp, picked = torch.empty_like(top), torch.empty_like(top)
        best = torch.empty(n, dtype=torch.long, device=img.device)
        _sample_tile[(-(-n // launch.samples), 1)](
            img, txt, order, col_start, col_end, targets, top, logit_scale, picked, top, best, sum_exp, top, top,
            img, n, dim, img.stride(0), txt.stride(0), HAS_TARGET=True, HAS_WEIGHT=False, BACKWARD=False,
            STATS=True, **_meta(launch, img.dtype))
        _save(ctx, launch, img, txt, logit_scale, targets, None, top, tiles)
        ctx.mark_non_differentiable(top, best)
        return top, sum_exp, picked, best

    @staticmethod
    def backward(ctx, _grad_top, grad_sum, grad_picked, _grad_best):
        return (*_backward(ctx, grad_sum, grad_picked), None, None, None, None)


def _common_dtype(image_features: torch.Tensor, class_features: torch.Tensor):
    """Both in one dtype for the kernel's products: fp32 (the reference's) unless both are the same."""
    if image_features.dtype != class_features.dtype:
        return image_features.float(), class_features.float()
    return image_features, class_features


def fused_applies(enabled: str, image_features: torch.Tensor, class_features: torch.Tensor,
                  logit_scale: torch.Tensor, tasks: torch.Tensor, class_task: torch.Tensor,
                  targets: Optional[torch.Tensor] = None) -> bool:
    """Whether the fused path applies: Triton available for these tensors (``kernels.enabled``), each task's
    columns contiguous (``class_task`` sorted) and every target inside its sample's task."""
    tensors = [image_features, class_features, logit_scale, tasks, class_task]
    if not use_triton(enabled, *tensors):
        return False
    checks = [(class_task[1:] >= class_task[:-1]).all()]
    if targets is not None:
        checks.append((class_task[targets] == tasks).all())
    return bool(torch.stack(checks).all())


def fused_cosine_cross_entropy(image_features: torch.Tensor, class_features: torch.Tensor,
                               logit_scale: torch.Tensor, tasks: torch.Tensor, targets: torch.Tensor,
                               class_task: torch.Tensor,
                               task_weights: Optional[torch.Tensor] = None,
                               launch: Optional[LossLaunch] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, predictions)`` where ``fused_applies``: the multi-task loss of ``exp(logit_scale) * cos``
    logits (per-task softmax cross-entropy over each sample's own task's columns, summed and divided by
    the batch size; ``task_weights [T]`` scale each task's terms) and each sample's within-task argmax;
    ``launch``: the tiles (default: ``launch.loss_launch`` for this device, dtype and dimension)."""
    image_features, class_features = _common_dtype(image_features, class_features)
    weight = None if task_weights is None else task_weights.to(image_features.device).float()[tasks].contiguous()
    per_sample, preds = _CosineCE.apply(image_features, class_features, logit_scale.reshape(()),
                                        tasks.contiguous(), targets.contiguous(), class_task.contiguous(), weight,
                                        _launch(image_features, launch))
    return per_sample.sum() / image_features.shape[0], preds


def fused_within_task_predict(image_features: torch.Tensor, class_features: torch.Tensor,
                              logit_scale: torch.Tensor, tasks: torch.Tensor, class_task: torch.Tensor,
                              launch: Optional[LossLaunch] = None) -> torch.Tensor:
    """Each sample's predicted column among its own task's columns, where ``fused_applies``."""
    image_features, class_features = (t.contiguous() for t in _common_dtype(image_features, class_features))
    n, dim = image_features.shape
    launch = _launch(image_features, launch)
    order, col_start, col_end, _, _ = _tiles(tasks, class_task.contiguous())
    pred = torch.empty(n, dtype=torch.long, device=image_features.device)
    _sample_tile[(-(-n // launch.samples), 1)](
        image_features, class_features, order, col_start, col_end, pred, pred, logit_scale.reshape(()), pred,
        pred, pred, pred, pred, pred, pred, n, dim, image_features.stride(0), class_features.stride(0),
        HAS_TARGET=False, HAS_WEIGHT=False, BACKWARD=False, STATS=False, **_meta(launch, image_features.dtype))
    return pred


def fused_share_stats(image_features: torch.Tensor, share_features: torch.Tensor, logit_scale: torch.Tensor,
                      class_ids: torch.Tensor, share_task: torch.Tensor, tasks: torch.Tensor,
                      local_targets: torch.Tensor, launch: Optional[LossLaunch] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top, sum_exp, target, best)`` of one class share, where ``fused_applies`` (with ``share_task``, the
    task of each of the share's columns, as ``class_task``): per sample of ``tasks [B]``, over the share's
    columns of its task, the largest ``exp(logit_scale) * cos`` logit (-inf without such a column; no
    gradient), the sum of exponentials relative to it (differentiable, the top taken as a constant), the
    logit of the sample's target column ``local_targets [B]`` (0 where it is -1: the share lacks the
    target), and the first best column as a global class id ``class_ids[column]`` (0 without a column)."""
    image_features, share_features = _common_dtype(image_features, share_features)
    top, sum_exp, target, best = _ShareStats.apply(
        image_features, share_features, logit_scale.reshape(()), tasks.contiguous(), local_targets.contiguous(),
        share_task.contiguous(), _launch(image_features, launch))
    best = torch.where(torch.isfinite(top), class_ids[best], torch.zeros_like(best))
    return top, sum_exp, target, best
