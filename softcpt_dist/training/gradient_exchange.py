"""The learnable gradients' exchange between ranks, by their structure (ZeRO-0 with class-parallel scoring).

With class-parallel scoring (``model/share_loss.py``) each rank's gradient is its class share's part of
the global batch's gradient, and the ranks' parts are averaged (their sum over W, as DeepSpeed's own
reduction does). DeepSpeed all-reduces every learnable tensor whole; here instead:

- **the meta network's weight** (one bias-free linear layer, the paper's): its gradient is a sum of outer
  products ``dyᵀ x``, one per task (or class) a rank encoded (``model/gradient_factors.py``). The ranks
  all-gather those rows -- rows × (out + in) numbers instead of out × in -- and every rank forms the sum.
  Where the rows would cost more than the matrix (class-aware variants over many classes), the matrix is
  all-reduced with the rest instead; every rank takes the same decision from the same row counts.
- **everything else** (task and class contexts): one flat all-reduce, as DeepSpeed's.

Only under ZeRO-0: ZeRO-1 and -2 reduce gradients inside DeepSpeed's partitioned optimizer (its
bookkeeping needs its own reduction) and ZeRO-3 partitions the weights; there DeepSpeed's reduction stays.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from softcpt_dist import distributed as D
from softcpt_dist.model.gradient_factors import GradientFactors
from softcpt_dist.model.meta_net import MetaNet


class StructuredGradients:
    """Installs gradient factors on ``model``'s linear meta networks; ``exchange()`` at each accumulation
    boundary (after the backward, before the optimizer) leaves every learnable tensor's ``grad`` the ranks'
    average on every rank."""

    def __init__(self, model):
        self.meta_nets: List[MetaNet] = [m for m in model.method.modules()
                                         if isinstance(m, MetaNet) and m.kind == "lin"]
        for meta in self.meta_nets:
            meta.factors = GradientFactors()
        factored = {id(m.net.weight) for m in self.meta_nets}
        self.rest = [p for p in model.learnable_parameters().values() if id(p) not in factored]
        self.factor_bytes = 0  # received by the factors' all-gathers so far
        self.allreduce_bytes = 0  # fp32 gradient bytes all-reduced so far (per rank, the tensors' size)

    def exchange(self) -> None:
        world, device = D.world_size(), self._device()
        taken = []
        for meta in self.meta_nets:
            weight = meta.net.weight
            taken.append(meta.factors.take(weight.shape[0], weight.shape[1], device))
        # Every rank's row count of every meta network: one small all-reduce.
        counts = torch.zeros(len(taken), world, dtype=torch.float64)
        for i, (grads, _) in enumerate(taken):
            counts[i, D.rank()] = len(grads)
        counts = D.all_reduce(counts)
        flat_extra: List[torch.Tensor] = []
        for meta, (grads, inputs), sizes in zip(self.meta_nets, taken, counts.long().tolist()):
            weight = meta.net.weight
            out_f, in_f = weight.shape
            if sum(sizes) * (out_f + in_f) < out_f * in_f:
                rows = D.all_gather_padded(torch.cat([grads, inputs], dim=1), sizes)
                self.factor_bytes += world * max(sizes) * (out_f + in_f) * 4
                summed = rows[:, :out_f].t().mm(rows[:, out_f:]) / world
                weight.grad = summed.to(weight.dtype)
            else:  # more rows than the matrix is worth: all-reduced with the rest
                local = grads.t().mm(inputs)
                weight.grad = local.to(weight.dtype)
                flat_extra.append(weight)
        params = self.rest + flat_extra
        if params:
            flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).float() for p in params])
            flat = D.all_reduce(flat) / world
            self.allreduce_bytes += flat.numel() * 4
            offset = 0
            for p in params:
                part = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
                if p.grad is None:
                    p.grad = part
                else:
                    p.grad.copy_(part)

    def _device(self):
        for meta in self.meta_nets:
            return meta.net.weight.device
        return torch.device("cpu")

    def counters(self) -> Dict[str, int]:
        return {"factor_bytes": self.factor_bytes, "allreduce_bytes": self.allreduce_bytes}
