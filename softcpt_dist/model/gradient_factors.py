"""A bias-free linear layer whose weight gradient is kept as its factors instead of being formed.

The weight gradient of ``y = x Wᵀ`` is ``Σ_rows dyᵀ x``: a sum of outer products, one per input row. For
SoftCPT's meta network the rows are the tasks a rank encodes (a few), while the weight is large (N·D × F:
4.2 M elements for ViT-B, 9.4 M for ViT-L), so exchanging the rows' ``(dy, x)`` between ranks costs a small
fraction of all-reducing the matrix (``training/gradient_exchange.py`` does that and forms the gradient).
The input gradient is computed as usual.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F


class GradientFactors:
    """The ``(dy, x)`` rows recorded by the backwards of one factored layer since the last ``take``."""

    def __init__(self):
        self._grads: List[torch.Tensor] = []
        self._inputs: List[torch.Tensor] = []

    def record(self, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
        self._grads.append(grad_output.detach().float())
        self._inputs.append(inputs.detach().float())

    def take(self, out_features: int, in_features: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(dy [n, out], x [n, in])`` of every recorded row (none: zero rows), and forget them."""
        if not self._grads:
            return torch.zeros(0, out_features, device=device), torch.zeros(0, in_features, device=device)
        grads, inputs = torch.cat(self._grads), torch.cat(self._inputs)
        self._grads, self._inputs = [], []
        return grads, inputs


class _FactoredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, factors: GradientFactors, rows: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.factors, ctx.rows, ctx.input_grad = factors, rows, x.requires_grad
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        ctx.factors.record(grad[:ctx.rows], x[:ctx.rows])
        return (grad.mm(weight) if ctx.input_grad else None), None, None, None


def factored_linear(x: torch.Tensor, weight: torch.Tensor, factors: GradientFactors, rows: int) -> torch.Tensor:
    """``F.linear(x, weight)`` whose backward records the first ``rows`` rows' ``(dy, x)`` in ``factors``
    and gives ``weight`` no gradient (the rest of ``x`` is padding: ``batch_invariance.rowwise``)."""
    return _FactoredLinear.apply(x, weight, factors, rows)
