"""Attention over the packed node rows of a shared-prefix layout, in PyTorch: the reference path.

Every node attends to its ancestors and itself (``prompt_layout.py`` says why that is exact). The
layout's buckets batch segments of equal start depth and length into one ``scaled_dot_product_attention``
call each; ``kernels/shared_prefix_attention.py`` is the fused Triton version of the same map, which
``shared_prefix_attention`` calls where ``kernels.enabled`` and the tensors allow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softcpt_dist.kernels._triton import use_triton
from softcpt_dist.kernels.shared_prefix_attention import triton_shared_prefix_attention
from softcpt_dist.model.prompt_layout import SharedPrefixLayout


def shared_prefix_attention(qkv: torch.Tensor, layout: SharedPrefixLayout, heads: int,
                            enabled: str = "auto") -> torch.Tensor:
    """Dispatcher: attention of the layout's nodes, ``qkv [U, 3W] -> [U, W]`` (before the out-projection);
    the Triton kernel where ``kernels._triton.use_triton`` says so, else ``bucket_attention``."""
    if use_triton(enabled, qkv):
        plans = layout.__dict__.setdefault("_tile_plans", {})  # layouts are cached: once per prompt structure
        return triton_shared_prefix_attention(qkv, layout.node_parent, layout.subtree_end, heads, plans)
    return bucket_attention(qkv, layout, heads)


def bucket_attention(qkv: torch.Tensor, layout: SharedPrefixLayout, heads: int) -> torch.Tensor:
    """Packed ``qkv [U, 3W]`` (the in-projection's output, one row per node) -> attention output ``[U, W]``
    (before the out-projection), rows in node order."""
    width = qkv.shape[-1] // 3
    # One gather each for all queries (bucket order), keys and values: a few large copies (each
    # backward is one index_add), after which every bucket is a contiguous slice.
    q, k, v = (t.contiguous() for t in qkv.chunk(3, dim=-1))
    queries = q.index_select(0, layout.query_rows).split(layout.query_sizes)
    keys = k.index_select(0, layout.key_rows).split(layout.key_sizes)
    values = v.index_select(0, layout.key_rows).split(layout.key_sizes)
    parts = []
    for bucket, qb, kb, vb in zip(layout.buckets, queries, keys, values):
        n, length = bucket.queries.shape
        qb, kb, vb = (t.view(n, -1, heads, width // heads).transpose(1, 2) for t in (qb, kb, vb))
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bucket.mask)  # [n, H, len, dh]
        parts.append(out.transpose(1, 2).reshape(n * length, width))
    return torch.cat(parts).index_select(0, layout.order)
