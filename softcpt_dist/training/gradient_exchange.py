"""The learnable gradients' exchange between ranks, by their structure (ZeRO-0 with class-parallel scoring).

With class-parallel scoring (``model/share_loss.py``) each rank's gradient is its class share's part of
the global batch's gradient, and the ranks' parts are averaged (their sum over W, as DeepSpeed's own
reduction does). DeepSpeed all-reduces every learnable tensor whole; here the meta network's weight (one
bias-free linear layer, the paper's: 4.2 M elements for ViT-B, 9.4 M for ViT-L) goes as its factors
(``model/gradient_factors.py``): per task (per class for the class-aware variants), the output gradient
summed over the rank's rows and the row's input. Summed over ranks that is keys × (out + in + 1) numbers,
from which every rank forms the matrix. The class-aware variants' rows ``[class feature | task feature]``
split by part: the task part by task, the class part as its matrix (``GradientFactors``). Where every
layout would cost more than the matrix, the matrix itself is reduced. Everything (factors or matrix, task and class
contexts) goes in **one** flat all-reduce per optimizer step.

Rows read by one rank only are not sent at all. A learnable tensor whose rows belong to classes or tasks
(``Method.class_rows``: CoOp-CS's and the CS variants' class contexts, per-task contexts) has each row read by
the ranks whose class share holds one of its classes. Where every step encodes every class (no task-grouped
batches, no class sampling), the shares are the same all run, so a row read by one rank gets its whole
gradient there and is used nowhere else: it stays on its owner, and the other ranks' copies of it go stale
(their zero gradient still moves them under momentum and weight decay). ``synchronize`` makes every rank's
copy (the tensor and its optimizer state) its owner's again before anything reads the tensor whole: a
checkpoint, the learnable state, the end of training. Gradient clipping then needs the global norm, which
``clip`` forms from the owned rows' squares summed over ranks. Where the shares change from step to step,
every row is all-reduced.

Only under ZeRO-0: ZeRO-1 and -2 reduce gradients inside DeepSpeed's partitioned optimizer (its
bookkeeping needs its own reduction) and ZeRO-3 partitions the weights; there DeepSpeed's reduction stays.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from softcpt_dist import distributed as D
from softcpt_dist.model.meta_net import MetaNet


class OwnedRows(NamedTuple):
    """A learnable tensor's rows by their readers: ``mine`` (bool ``[rows]``) read by this rank alone,
    ``owned`` (row indices) read by one rank, ``owner`` (each owned row's rank) and ``shared`` (row indices)
    read by several; rows no rank reads get no gradient anywhere."""

    param: torch.Tensor
    mine: torch.Tensor
    owned: torch.Tensor
    owner: torch.Tensor
    shared: torch.Tensor


def owned_rows(param: torch.Tensor, class_row: torch.Tensor, shares: Sequence[torch.Tensor], rank: int) -> OwnedRows:
    """Who reads which row of ``param``: ``class_row [C]`` is the row each class's encoding reads and
    ``shares[r]`` the classes rank ``r`` encodes."""
    readers = torch.zeros(param.shape[0], len(shares), dtype=torch.bool)
    for r, share in enumerate(shares):
        readers[class_row.cpu()[share.cpu()], r] = True
    count = readers.sum(dim=1)
    owned = torch.nonzero(count == 1).flatten()
    owner = readers[owned].float().argmax(dim=1)
    device = param.device
    return OwnedRows(param, (readers[:, rank] & (count == 1)).to(device), owned.to(device), owner.to(device),
                     torch.nonzero(count > 1).flatten().to(device))


class StructuredGradients:
    """Makes ``model``'s linear meta networks record their gradient factors (where the keys cost less than the
    matrix); ``exchange()`` at each accumulation boundary (after the backward, before the optimizer) leaves
    every learnable tensor's ``grad`` the ranks' average on every rank, except for rows owned by one rank
    (``shares``: each rank's classes, when they are fixed for the run), whose average is on their owner only."""

    def __init__(self, model, shares: Optional[Sequence[torch.Tensor]] = None):
        self.factored = []  # (meta network, its GradientFactors)
        for meta in model.method.modules():
            if isinstance(meta, MetaNet) and meta.factor_elements() is not None:
                self.factored.append((meta, meta.record_factors()))
        factored = {id(meta.net.weight) for meta, _ in self.factored}
        learnable = model.learnable_parameters()
        self.owned: List[OwnedRows] = []
        if shares is not None:
            for name, class_row in model.method.class_rows().items():
                rows = owned_rows(learnable[name], class_row, shares, D.rank())
                if len(rows.owned):
                    self.owned.append(rows)
        by_rows = {id(rows.param) for rows in self.owned}
        self.rest = [p for p in learnable.values() if id(p) not in factored | by_rows]
        self._weight_grads: Dict[int, torch.Tensor] = {}  # id(factored weight) -> its gradient's buffer
        self.diverged = False  # whether some rank's copy of an owned row differs from its owner's
        self.factor_bytes = 0  # fp32 factor-table bytes all-reduced so far (per rank, the tables' size)
        self.allreduce_bytes = 0  # fp32 gradient bytes all-reduced so far (per rank, the tensors' size)

    def exchange(self) -> None:
        world = D.world_size()
        device = next(iter(self.rest or [r.param for r in self.owned] or [self.factored[0][0].net.weight])).device
        tables = [factors.take(device) for _, factors in self.factored]
        grads = [_grad(p).reshape(-1).float() for p in self.rest]
        shared = [_grad(rows.param)[rows.shared].reshape(-1).float() for rows in self.owned]
        flat = D.all_reduce(torch.cat([t.reshape(-1) for t in tables] + grads + shared)) / world
        self.factor_bytes += sum(t.numel() for t in tables) * 4
        self.allreduce_bytes += sum(g.numel() for g in grads + shared) * 4
        offset = 0
        for (meta, factors), table in zip(self.factored, tables):
            summed = flat[offset:offset + table.numel()]
            offset += table.numel()
            # the inputs and counts were averaged alike, so each key's input stays their mean
            weight = meta.net.weight
            if weight.dtype == torch.float32:  # into a buffer kept across steps (the optimizer may drop .grad)
                buffer = self._weight_grads.get(id(weight))
                if buffer is None:
                    buffer = self._weight_grads[id(weight)] = torch.empty_like(weight)
                weight.grad = factors.weight_grad(summed, out=buffer)
            else:
                weight.grad = factors.weight_grad(summed).to(weight.dtype)
        for p in self.rest:
            part = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = part
            else:
                p.grad.copy_(part)
        for rows in self.owned:
            grad = rows.param.grad = _grad(rows.param)
            size = grad[rows.shared].numel()
            # an owned row's gradient is whole on its owner (zero elsewhere): the ranks' average is it over W
            grad[rows.mine] /= world
            grad[rows.shared] = flat[offset:offset + size].view(-1, *grad.shape[1:]).to(grad.dtype)
            offset += size
        self.diverged = self.diverged or bool(self.owned)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Scale every learnable gradient so that their global norm is at most ``max_norm``, as DeepSpeed's
        clipping does (coefficient ``max_norm / (norm + 1e-6)``, at most 1); the owned rows' squares are summed
        over ranks, the rest are the same everywhere. Returns the norm."""
        grads = [p.grad for p in self.rest if p.grad is not None]
        grads += [meta.net.weight.grad for meta, _ in self.factored if meta.net.weight.grad is not None]
        common = sum((g.detach().float().pow(2).sum() for g in grads), torch.zeros(()))
        own = torch.zeros(())
        for rows in self.owned:
            grad = rows.param.grad.detach().float()
            common = common + grad[rows.shared].pow(2).sum()
            own = own + grad[rows.mine].pow(2).sum()
        norm = (common + D.all_reduce(own.reshape(1))[0]).sqrt()
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads + [rows.param.grad for rows in self.owned]:
            g.mul_(coefficient.to(g.dtype))
        return norm

    def synchronize(self, optimizer) -> None:
        """Every rank's copy of every owned row -- the tensor and its optimizer state -- its owner's again; all
        ranks call it together (a no-op until an exchange has left owned rows behind)."""
        if not self.diverged:
            return
        tensors = []
        for rows in self.owned:
            state = optimizer.state.get(rows.param, {})
            tensors += [(rows, rows.param.data)] + [
                (rows, state[k]) for k in sorted(state) if torch.is_tensor(state[k])
                and state[k].shape == rows.param.shape]
        pieces = []
        for rows, t in tensors:
            mine = (rows.owner == D.rank()).view(-1, *[1] * (t.dim() - 1))
            pieces.append(torch.where(mine, t[rows.owned].float(), 0.0).reshape(-1))
        flat = D.all_reduce(torch.cat(pieces))
        offset = 0
        for rows, t in tensors:
            size = t[rows.owned].numel()
            t[rows.owned] = flat[offset:offset + size].view(-1, *t.shape[1:]).to(t.dtype)
            offset += size
        self.diverged = False

    def counters(self) -> Dict[str, int]:
        return {"factor_bytes": self.factor_bytes, "allreduce_bytes": self.allreduce_bytes}


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad
