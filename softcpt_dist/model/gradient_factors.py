"""A bias-free linear layer whose weight gradient is kept as its factors instead of being formed.

The weight gradient of ``y = x Wᵀ`` is ``Σ_rows dyᵀ x``: a sum of outer products, one per input row. For
SoftCPT's meta network a row is a task's feature (or a class's, for the class-aware variants), the same on
every rank that encodes that task, while the weight is large (N·D × F: 4.2 M elements for ViT-B, 9.4 M for
ViT-L). So the rows are kept by key (the task or class they belong to): per key, the summed output
gradient and the input. Summing those over ranks -- keys × (out + in) numbers -- and forming the matrix
afterwards gives the whole gradient at a small fraction of all-reducing the matrix
(``training/gradient_exchange.py``). The input gradient is computed as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GradientFactors:
    """Per key (``keys`` slots), the output gradients recorded since the last ``take``, summed, and the
    input, summed with a count (the same row recorded by several micro-batches of one update)."""

    def __init__(self, keys: int, out_features: int, in_features: int):
        self.keys, self.out_features, self.in_features = keys, out_features, in_features
        self.table = None  # [keys, out + in + 1]: summed dy | summed x | count

    def record(self, grad_output: torch.Tensor, inputs: torch.Tensor, keys: torch.Tensor) -> None:
        if self.table is None:
            self.table = grad_output.new_zeros(self.keys, self.out_features + self.in_features + 1,
                                               dtype=torch.float32)
        rows = torch.cat([grad_output.detach().float(), inputs.detach().float(),
                          torch.ones(len(keys), 1, device=grad_output.device)], dim=1)
        self.table.index_add_(0, keys.to(self.table.device), rows)

    def take(self, device) -> torch.Tensor:
        """The table ``[keys, out + in + 1]`` (zeros if nothing was recorded), and forget it."""
        table = self.table if self.table is not None else torch.zeros(
            self.keys, self.out_features + self.in_features + 1, device=device)
        self.table = None
        return table

    def weight_grad(self, table: torch.Tensor) -> torch.Tensor:
        """``Σ_keys dyᵀ x`` from a (summed) table: each key's input is its recorded inputs' mean."""
        dy, x, count = table[:, :self.out_features], table[:, self.out_features:-1], table[:, -1:]
        used = count.squeeze(1) > 0
        return dy[used].t().mm(x[used] / count[used])


class _FactoredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, factors: GradientFactors, keys: torch.Tensor):
        ctx.save_for_backward(x, weight)
        ctx.factors, ctx.keys, ctx.input_grad = factors, keys, x.requires_grad
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = len(ctx.keys)
        ctx.factors.record(grad[:rows], x[:rows], ctx.keys)
        # under fp16 autocast (model.precision=official_amp) the forward ran in fp16: so does this product, as
        # F.linear's own backward (autograd casts the result to x's dtype)
        return (grad.mm(weight.to(grad.dtype)) if ctx.input_grad else None), None, None, None


def factored_linear(x: torch.Tensor, weight: torch.Tensor, factors: GradientFactors, keys: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` whose backward records the first ``len(keys)`` rows' ``(dy, x)`` in ``factors``
    under ``keys`` and gives ``weight`` no gradient (the rest of ``x`` is padding: ``batch_invariance.rowwise``)."""
    return _FactoredLinear.apply(x, weight, factors, keys)
