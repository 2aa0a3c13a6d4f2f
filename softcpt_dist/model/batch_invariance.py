"""Matrix products whose rows do not depend on how many rows are multiplied together.

CPU BLAS kernels (and GPU ones) pick a different kernel for a product with very few rows (on this
project's CPU machines: up to 3, or up to 15) than for a larger one, and the two sum in different orders, so the
same row comes out a few ulps apart. Class-parallel encoding changes how many task features,
prompts or images share one product (a rank holds 1 task where one rank held 6; its task prompt is
then a packed text input of a dozen rows), so those products are padded to at least ``MIN_ROWS`` rows: each row is then computed by the same
kernel whatever its company (padding rows are zeros and are dropped; they contribute exact zeros
to gradients). Attention does the same with short segments' queries (``prompt_layout.MIN_ROWS``).
"""

from __future__ import annotations

from typing import Callable

import torch

# Seen here: an AVX2 CPU switched at 4 rows; an AVX-512 one (Sapphire Rapids, MKL) at 16 for inputs of 512
# and wider (6 for 128), for every shape up to ViT-L's, with one BLAS thread. Padding beyond a CPU's own
# threshold changes nothing, so the largest seen is used.
MIN_ROWS = 16


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn`` (a linear layer, a projection) on ``x [M, ...]``, computed on at
    least ``MIN_ROWS`` rows."""
    rows = x.shape[0]
    if rows >= MIN_ROWS:
        return fn(x)
    return fn(torch.cat([x, x.new_zeros(MIN_ROWS - rows, *x.shape[1:])]))[:rows]

