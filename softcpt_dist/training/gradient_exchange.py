"""The learnable gradients' exchange between ranks, by their structure (ZeRO-0 with class-parallel scoring).

With class-parallel scoring (``model/share_loss.py``) each rank's gradient is its class share's part of
the global batch's gradient, and the ranks' parts are averaged (their sum over W, as DeepSpeed's own
reduction does). DeepSpeed all-reduces every learnable tensor whole; here the meta network's weight (one
bias-free linear layer, the paper's: 4.2 M elements for ViT-B, 9.4 M for ViT-L) goes as its factors
(``model/gradient_factors.py``): per task (per class for the class-aware variants), the output gradient
summed over the rank's rows and the row's input. Summed over ranks that is keys × (out + in + 1) numbers,
from which every rank forms the matrix. Where the keys would cost more than the matrix (class-aware
variants over many classes) the matrix itself is reduced. Everything (factors or matrix, task and class
contexts) goes in **one** flat all-reduce per optimizer step.

Only under ZeRO-0: ZeRO-1 and -2 reduce gradients inside DeepSpeed's partitioned optimizer (its
bookkeeping needs its own reduction) and ZeRO-3 partitions the weights; there DeepSpeed's reduction stays.
"""

from __future__ import annotations

from typing import Dict

import torch

from softcpt_dist import distributed as D
from softcpt_dist.model.meta_net import MetaNet


class StructuredGradients:
    """Makes ``model``'s linear meta networks record their gradient factors (where the keys cost less than the
    matrix); ``exchange()`` at each accumulation boundary (after the backward, before the optimizer) leaves
    every learnable tensor's ``grad`` the ranks' average on every rank."""

    def __init__(self, model):
        self.factored = []  # (meta network, its GradientFactors)
        for meta in model.method.modules():
            if isinstance(meta, MetaNet) and meta.kind == "lin" and meta.key_count is not None:
                out_f, in_f = meta.net.weight.shape
                if meta.key_count * (out_f + in_f + 1) < out_f * in_f:
                    self.factored.append((meta, meta.record_factors()))
        factored = {id(meta.net.weight) for meta, _ in self.factored}
        self.rest = [p for p in model.learnable_parameters().values() if id(p) not in factored]
        self.factor_bytes = 0  # fp32 factor-table bytes all-reduced so far (per rank, the tables' size)
        self.allreduce_bytes = 0  # fp32 gradient bytes all-reduced so far (per rank, the tensors' size)

    def exchange(self) -> None:
        world = D.world_size()
        device = self.rest[0].device if self.rest else self.factored[0][0].net.weight.device
        tables = [factors.take(device) for _, factors in self.factored]
        grads = [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).float() for p in self.rest]
        flat = D.all_reduce(torch.cat([t.reshape(-1) for t in tables] + grads)) / world
        self.factor_bytes += sum(t.numel() for t in tables) * 4
        self.allreduce_bytes += sum(g.numel() for g in grads) * 4
        offset = 0
        for (meta, factors), table in zip(self.factored, tables):
            summed = flat[offset:offset + table.numel()].view_as(table)
            offset += table.numel()
            # the inputs and counts were averaged alike, so each key's input stays their mean
            meta.net.weight.grad = factors.weight_grad(summed).to(meta.net.weight.dtype)
        for p in self.rest:
            part = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = part
            else:
                p.grad.copy_(part)

    def counters(self) -> Dict[str, int]:
        return {"factor_bytes": self.factor_bytes, "allreduce_bytes": self.allreduce_bytes}
