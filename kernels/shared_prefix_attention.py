"""Shared-prefix attention as one fused Triton kernel (forward) and two (backward), online softmax.

The layout's nodes are numbered in preorder, so node ``k``'s subtree is the contiguous range
``k .. subtree_end[k] - 1`` and query ``q`` attends key ``k`` iff ``k <= q < subtree_end[k]``: a prefix
node is seen by all of its task's class suffixes, a suffix token by its own later tokens only.
Tiles follow from that:

- a tile of ``BLOCK_M`` consecutive query nodes ``[a, a + BLOCK_M)`` needs only the ancestors of ``a``
  (a key ``x < a`` that some query of the tile attends is an ancestor of ``a``: ``a`` lies between
  ``x`` and that query in preorder, so inside ``x``'s subtree) and the tile itself. Forward and dQ
  loop over those keys, with no L x L score matrix and no padding of suffixes to one length.
- a tile of ``BLOCK_N`` consecutive key nodes ``[c, c + BLOCK_N)`` is attended only by the queries
  ``[c, max subtree_end)``; dK and dV loop over those. Each program owns its rows of dQ or dK/dV,
  so the backward is deterministic (no atomics).

The kernel takes plain tensors (the nodes' ``qkv``, ``node_parent`` and ``subtree_end``); the model's
dispatcher (``softcpt_dist.model.tree_attention.shared_prefix_attention``) decides when to call it, and
its bucketed PyTorch path is the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from softcpt_dist.kernels._triton import block, dot_precision, kernel, tl
from softcpt_dist.kernels.launch import AttentionLaunch, attention_launch, device_target


@dataclass
class TilePlan:
    """The ancestors of each query tile's first node, root first (CSR: ``ancestors[start[t]:start[t+1]]``)."""

    tiles: int
    start: torch.Tensor  # [tiles + 1] int64
    ancestors: torch.Tensor  # int64


def tile_plan(node_parent: torch.Tensor, block_m: int, cache: Optional[Dict[int, TilePlan]] = None) -> TilePlan:
    """The plan of the preorder tree ``node_parent`` (-1 at roots) for query tiles of ``block_m`` nodes;
    kept in ``cache`` by ``block_m`` (the caller's, per tree) when one is given."""
    cache = {} if cache is None else cache
    if block_m not in cache:
        parent = node_parent
        firsts = torch.arange(0, parent.shape[0], block_m, device=parent.device)
        chain, current = [], parent[firsts]
        while bool((current >= 0).any()):  # walk up: parents, grandparents, ... (at most the context length)
            chain.append(current)
            current = torch.where(current >= 0, parent[current.clamp(min=0)], current)
        if chain:
            table = torch.stack(chain[::-1], dim=1)  # [tiles, depth]: root first, -1 before shallow tiles' roots
            ancestors = table[table >= 0]
            counts = (table >= 0).sum(dim=1)
        else:
            ancestors, counts = firsts.new_zeros(0), torch.zeros_like(firsts)
        start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        cache[block_m] = TilePlan(len(firsts), start, ancestors)
    return cache[block_m]


@kernel
def _query_tile(QKV, OUT, LSE, GRAD_OUT, DELTA, GRAD_QKV, SUBTREE_END, ANC_START, ANCESTORS, n_nodes, width,
                stride_qkv, stride_out, sm_scale, BACKWARD: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile and head: the forward (output and log-sum-exp) or, with ``BACKWARD``, dQ (from the
    same keys) and delta = rowsum(dO * O) for ``_key_tile``."""
    tile, head = tl.program_id(0), tl.program_id(1)
    first = tile.to(tl.int64) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < n_nodes
    d = tl.arange(0, BLOCK_D)
    col = head * HEAD_DIM + d
    row_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(QKV + rows[:, None] * stride_qkv + col[None, :], mask=row_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # output (forward) or dQ (backward)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if BACKWARD:
        do = tl.load(GRAD_OUT + rows[:, None] * stride_out + col[None, :], mask=row_mask, other=0.0)
        o = tl.load(OUT + rows[:, None] * stride_out + col[None, :], mask=row_mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + head * n_nodes + rows, delta, mask=row_ok)
        lse = tl.load(LSE + head * n_nodes + rows, mask=row_ok, other=0.0)
    lo = tl.load(ANC_START + tile)
    hi = tl.load(ANC_START + tile + 1)
    n_ancestor_blocks = tl.cdiv(hi - lo, BLOCK_N)
    for j in range(0, n_ancestor_blocks + BLOCK_M // BLOCK_N):  # the first node's ancestors, then the tile
        from_ancestors = j < n_ancestor_blocks
        offs = lo + j * BLOCK_N + tl.arange(0, BLOCK_N)
        own = first + (j - n_ancestor_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        listed = tl.load(ANCESTORS + offs, mask=from_ancestors & (offs < hi), other=0)
        keys = tl.where(from_ancestors, listed, own)
        ok = tl.where(from_ancestors, offs < hi, own < n_nodes)
        end = tl.load(SUBTREE_END + keys, mask=ok, other=0)
        see = ok[None, :] & (keys[None, :] <= rows[:, None]) & (rows[:, None] < end[None, :])  # ancestor or self
        kv_mask = ok[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(QKV + keys[:, None] * stride_qkv + (width + col)[None, :], mask=kv_mask, other=0.0)
        v = tl.load(QKV + keys[:, None] * stride_qkv + (2 * width + col)[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        if BACKWARD:
            p = tl.where(see, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            acc += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, input_precision=PRECISION)
        else:  # online softmax
            s = tl.where(see, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    if BACKWARD:
        tl.store(GRAD_QKV + rows[:, None] * stride_qkv + col[None, :],
                 (acc * sm_scale).to(GRAD_QKV.dtype.element_ty), mask=row_mask)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # every real node sees itself: only rows past the end have 0
        tl.store(OUT + rows[:, None] * stride_out + col[None, :], (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
                 mask=row_mask)
        tl.store(LSE + head * n_nodes + rows, m_i + tl.log(l_safe), mask=row_ok)


@kernel
def _key_tile(QKV, GRAD_OUT, LSE, DELTA, GRAD_QKV, SUBTREE_END, n_nodes, width, stride_qkv, stride_out,
                 sm_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of a tile of key nodes, from the queries of their subtrees."""
    tile, head = tl.program_id(0), tl.program_id(1)
    keys = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = keys < n_nodes
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    col = head * HEAD_DIM + d
    kv_mask = ok[:, None] & d_ok[None, :]
    k = tl.load(QKV + keys[:, None] * stride_qkv + (width + col)[None, :], mask=kv_mask, other=0.0)
    v = tl.load(QKV + keys[:, None] * stride_qkv + (2 * width + col)[None, :], mask=kv_mask, other=0.0)
    end = tl.load(SUBTREE_END + keys, mask=ok, other=0)
    stop = tl.max(end, 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for m0 in range(tile.to(tl.int64) * BLOCK_N, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_nodes
        row_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(QKV + rows[:, None] * stride_qkv + col[None, :], mask=row_mask, other=0.0)
        do = tl.load(GRAD_OUT + rows[:, None] * stride_out + col[None, :], mask=row_mask, other=0.0)
        lse = tl.load(LSE + head * n_nodes + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + head * n_nodes + rows, mask=row_ok, other=0.0)
        see = row_ok[:, None] & ok[None, :] & (keys[None, :] <= rows[:, None]) & (rows[:, None] < end[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        p = tl.where(see, tl.exp(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dtype = GRAD_QKV.dtype.element_ty
    tl.store(GRAD_QKV + keys[:, None] * stride_qkv + (width + col)[None, :], (dk * sm_scale).to(dtype), mask=kv_mask)
    tl.store(GRAD_QKV + keys[:, None] * stride_qkv + (2 * width + col)[None, :], dv.to(dtype), mask=kv_mask)


def _shapes(qkv: torch.Tensor, heads: int):
    nodes, three_width = qkv.shape
    if three_width % (3 * heads):
        raise ValueError(f"qkv width {three_width} is not 3 x heads ({heads}) x head dim")
    head_dim = three_width // (3 * heads)
    if head_dim > 256:
        raise ValueError(f"head dim {head_dim} > 256 is not supported by the attention kernel")
    return nodes, three_width // 3, head_dim


class _SharedPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, subtree_end, anc_start, ancestors, heads, launch: AttentionLaunch):
        qkv = qkv.contiguous()
        nodes, width, head_dim = _shapes(qkv, heads)
        out = qkv.new_empty(nodes, width)
        lse = torch.empty(heads, nodes, dtype=torch.float32, device=qkv.device)
        meta = dict(HEAD_DIM=head_dim, BLOCK_D=block(head_dim), PRECISION=dot_precision(qkv.dtype))
        sm_scale = 1.0 / math.sqrt(head_dim)
        query = launch.query
        _query_tile[(_cdiv(nodes, query.rows), heads)](qkv, out, lse, out, lse, qkv, subtree_end, anc_start, ancestors,
                                                       nodes, width, qkv.stride(0), out.stride(0), sm_scale,
                                                       BACKWARD=False, BLOCK_M=query.rows, BLOCK_N=query.cols, **meta,
                                                       **query.options())
        ctx.save_for_backward(qkv, out, lse, subtree_end, anc_start, ancestors)
        ctx.heads, ctx.meta, ctx.sm_scale, ctx.launch = heads, meta, sm_scale, launch
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse, subtree_end, anc_start, ancestors = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        nodes, width = out.shape
        grad_qkv = torch.empty_like(qkv)
        delta = torch.empty_like(lse)
        query, key = ctx.launch.query, ctx.launch.key
        _query_tile[(_cdiv(nodes, query.rows), ctx.heads)](
            qkv, out, lse, grad_out, delta, grad_qkv, subtree_end, anc_start, ancestors, nodes, width,
            qkv.stride(0), out.stride(0), ctx.sm_scale, BACKWARD=True, BLOCK_M=query.rows, BLOCK_N=query.cols,
            **ctx.meta, **query.options())
        _key_tile[(_cdiv(nodes, key.cols), ctx.heads)](
            qkv, grad_out, lse, delta, grad_qkv, subtree_end, nodes, width, qkv.stride(0), out.stride(0),
            ctx.sm_scale, BLOCK_M=key.rows, BLOCK_N=key.cols, **ctx.meta, **key.options())
        return grad_qkv, None, None, None, None, None


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // b)


def triton_shared_prefix_attention(qkv: torch.Tensor, node_parent: torch.Tensor, subtree_end: torch.Tensor,
                                   heads: int, plans: Optional[Dict[int, TilePlan]] = None,
                                   launch: Optional[AttentionLaunch] = None) -> torch.Tensor:
    """Attention of a preorder tree's nodes (``node_parent``, ``subtree_end``), ``qkv [U, 3W] -> [U, W]``
    (before the out-projection); ``plans``: the caller's cache of this tree's tile plans; ``launch``: the
    tiles (default: ``launch.attention_launch`` for this device, dtype and head dim)."""
    if launch is None:
        launch = attention_launch(qkv.dtype, _shapes(qkv, heads)[2], device_target(qkv.device))
    if launch.query.rows % launch.query.cols:
        raise ValueError(f"query tiles of {launch.query.rows} rows must be a multiple of {launch.query.cols} keys")
    plan = tile_plan(node_parent, launch.query.rows, plans)
    return _SharedPrefixAttention.apply(qkv, subtree_end, plan.start, plan.ancestors, heads, launch)
