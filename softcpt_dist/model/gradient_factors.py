"""A bias-free linear layer whose weight gradient is kept as its factors instead of being formed.

The weight gradient of ``y = x Wᵀ`` is ``Σ_rows dyᵀ x``: a sum of outer products, one per input row. For
SoftCPT's meta network a row is a task's feature (or a class's, for the class-aware variants), the same on
every rank that encodes that task, while the weight is large (N·D × F: 4.2 M elements for ViT-B, 9.4 M for
ViT-L). So the rows are kept by key (the task or class they belong to): per key, the summed output
gradient and the input. Summing those over ranks -- keys × (out + in) numbers -- and forming the matrix
afterwards gives the whole gradient at a small fraction of all-reducing the matrix
(``training/gradient_exchange.py``). The input gradient is computed as usual.

For the class-aware variants a row is ``[class feature | task feature]`` and the keys are classes, so a table
by class (classes × (out + in)) can cost nearly the matrix. Split by the input's parts it need not: the
task-feature columns' gradient ``Σ_classes dyᵀ t_task`` is ``Σ_tasks (Σ_its classes dy)ᵀ t_task``, factors by
task (``key_group``); the class-feature columns' (``dense_in`` leading columns, out × F) is formed here and
summed over ranks as a matrix. For General-10 on ViT-L (CA/CS): 9.6 M numbers instead of 16.5 M (by class)
or 18.9 M (the matrix).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class GradientFactors:
    """Per key (``keys`` slots), the output gradients recorded since the last ``take``, summed, and the
    input, summed with a count (the same row recorded by several micro-batches of one update).

    ``dense_in``: the leading input columns whose gradient is formed as a matrix instead (summed over
    ranks as is); ``key_group [keys]``: the slot each key's remaining columns go to (its task; default its
    own), so that keys sharing those columns (classes of one task) share one row of the table."""

    def __init__(self, keys: int, out_features: int, in_features: int, dense_in: int = 0,
                 key_group: Optional[torch.Tensor] = None):
        self.out_features, self.in_features, self.dense_in = out_features, in_features, dense_in
        self.key_group = key_group
        self.keys = keys if key_group is None else int(key_group.max()) + 1  # the table's rows
        self.table = None  # [keys, out + in - dense_in + 1]: summed dy | summed x | count
        self.dense = None  # [out, dense_in]: Σ dyᵀ x[:, :dense_in]

    @staticmethod
    def elements(keys: int, out_features: int, in_features: int, dense_in: int = 0) -> int:
        """Numbers exchanged for a layer of this shape with ``keys`` table rows."""
        return keys * (out_features + in_features - dense_in + 1) + out_features * dense_in

    @property
    def width(self) -> int:
        """A table row: summed dy | summed x (the columns not in ``dense_in``) | count."""
        return self.out_features + self.in_features - self.dense_in + 1

    def numel(self) -> int:
        return self.elements(self.keys, self.out_features, self.in_features, self.dense_in)

    def record(self, grad_output: torch.Tensor, inputs: torch.Tensor, keys: torch.Tensor) -> None:
        if self.table is None:
            self.table = grad_output.new_zeros(self.keys, self.width, dtype=torch.float32)
            self.dense = grad_output.new_zeros(self.out_features, self.dense_in, dtype=torch.float32)
        dy, x = grad_output.detach().float(), inputs.detach().float()
        if self.dense_in:
            self.dense.addmm_(dy.t(), x[:, :self.dense_in])
        slots = keys if self.key_group is None else self.key_group.to(keys.device)[keys]
        rows = torch.cat([dy, x[:, self.dense_in:], torch.ones(len(keys), 1, device=grad_output.device)], dim=1)
        self.table.index_add_(0, slots.to(self.table.device), rows)

    def take(self, device) -> torch.Tensor:
        """The table and the dense part, flat (zeros if nothing was recorded), and forget them."""
        if self.table is None:
            flat = torch.zeros(self.numel(), device=device)
        else:
            flat = torch.cat([self.table.reshape(-1), self.dense.reshape(-1)])
        self.table = self.dense = None
        return flat

    def weight_grad(self, flat: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Σ_rows dyᵀ x`` from a (summed) ``take``: each key's input is its recorded inputs' mean. Written
        into ``out [out, in]`` where given: a buffer kept across steps spares the allocator a fresh matrix
        (on CPUs, megabytes of page faults) every step."""
        width = self.width
        table = flat[:self.keys * width].view(self.keys, width)
        dy, x, count = table[:, :self.out_features], table[:, self.out_features:-1], table[:, -1:]
        used = count.squeeze(1) > 0
        if out is None:
            out = flat.new_empty(self.out_features, self.in_features)
        if not self.dense_in:
            return torch.mm(dy[used].t(), x[used] / count[used], out=out)
        out[:, :self.dense_in].copy_(flat[self.keys * width:].view(self.out_features, self.dense_in))
        out[:, self.dense_in:] = dy[used].t().mm(x[used] / count[used])
        return out


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
