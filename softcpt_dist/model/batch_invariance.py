"""Matrix products whose rows do not depend on how many rows are multiplied together.

CPU BLAS kernels (and GPU ones) pick a different kernel for a product with very few rows (on this
project's CPU machines: up to 3) than for a larger one, and the two sum in different orders, so the
same row comes out a few ulps apart. Class-parallel encoding changes how many task features,
prompts, images or attention queries share one product (a rank holds 1 task where one rank held 6),
so those products are padded to at least ``MIN_ROWS`` rows: each row is then computed by the same
kernel whatever its company (padding rows are zeros and are dropped; they contribute exact zeros
to gradients). Measured: 2 ranks then train within 1e-5 of one rank where they drifted to 6e-5.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

MIN_ROWS = 4  # this CPU's BLAS switches kernels at 4 rows


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` (a linear layer, a projection) on ``x [M, ...]``, computed on at
    least ``MIN_ROWS`` rows."""
    rows = x.shape[0]
    if rows >= MIN_ROWS:
        return fn(x)
    return fn(torch.cat([x, x.new_zeros(MIN_ROWS - rows, *x.shape[1:])]))[:rows]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention`` over ``[n, H, len, dh]`` queries with a ``[len, K]`` boolean mask,
    on at least ``MIN_ROWS`` query positions (its score and value products are matrix products over
    the queries): padding queries repeat the last one's mask and are dropped."""
    length = q.shape[2]
    if length >= MIN_ROWS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    extra = MIN_ROWS - length
    q = torch.cat([q, q.new_zeros(*q.shape[:2], extra, q.shape[3])], dim=2)
    mask = torch.cat([mask, mask[-1:].expand(extra, -1)])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, :, :length]
