"""Class-parallel text encoding: each rank encodes a disjoint share of the selected classes.

With CLIP frozen and image features cached, a step is almost all class-prompt encoding; data
parallelism alone would repeat it in full on every rank. Here the selected classes are cut into
shares, one per rank, balanced by the token positions their prompts cost on the text path (whole
tasks where possible, so a task's shared prompt prefix and its task prompt are encoded once; a
task costing more than one share is split by classes). Every rank encodes its share and the
features are all-gathered (``distributed.gather_rows``), so each rank scores its own micro-batch
against every class it needs.

Why the gradients are exactly those of the global batch: rank ``r``'s loss ``L_r`` is the mean over
its micro-batch, and DeepSpeed averages the learnable gradients over ranks, so the target is
``d/dθ (1/W) Σ_r L_r``. The gather's backward hands each rank the summed gradient of its own
features, ``Σ_r dL_r/df_s``; backward through its share gives ``G_s``, and DeepSpeed's average
``(1/W) Σ_s G_s`` is that target: no rescaling. Everything upstream of a share (task prompts, the
meta network) is computed by the rank that needs it, so no other tensor is communicated.

ZeRO-3 needs every rank to run the same partitioned forwards and backwards: a rank with an empty
share encodes one stand-in class whose gradient is exactly zero.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from softcpt_dist import distributed as D
from softcpt_dist.config import TextConfig
from softcpt_dist.model.loss import column_positions
from softcpt_dist.model.share_loss import ShareBatch


@dataclass
class ShardPlan:
    """Shares of a selection of classes: ``shares[r]`` are positions in the selection (sorted);
    ``inverse`` puts the rank-ordered concatenation of the shares back into selection order."""

    shares: List[torch.Tensor]
    costs: List[int]  # token positions of each share, as planned

    def __post_init__(self):
        self.sizes = [len(s) for s in self.shares]
        order = torch.cat(self.shares) if self.shares else torch.zeros(0, dtype=torch.long)
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(len(order))


def plan_shards(class_task: torch.Tensor, cost: Callable[[torch.Tensor], int], world_size: int) -> ShardPlan:
    """Cut a selection (``class_task[i]``: the task of selected class ``i``) into ``world_size`` shares.

    ``cost(positions)`` is the token positions that encoding those selected classes costs. Two
    candidates, and the one whose largest share costs least (whole tasks on a tie): whole tasks,
    largest first, each to the least loaded rank; and the tasks' classes in order, filling one rank
    after another up to ``total / world_size``, so that a task is split where a share fills up.
    Deterministic: every rank computes the same plan.
    """
    class_task = class_task.cpu()
    tasks = [torch.nonzero(class_task == t).flatten() for t in torch.unique(class_task).tolist()]
    candidates = [_whole_tasks(tasks, cost, world_size), _filled(tasks, cost, world_size)]
    plans = []
    for members in candidates:
        shares = [torch.sort(torch.cat(m)).values if m else torch.zeros(0, dtype=torch.long) for m in members]
        plans.append(ShardPlan(shares, [cost(s) if len(s) else 0 for s in shares]))
    return min(plans, key=lambda plan: max(plan.costs))  # min keeps the first (whole tasks) on a tie


def _whole_tasks(tasks: List[torch.Tensor], cost, world_size: int) -> List[List[torch.Tensor]]:
    loads, members = [0] * world_size, [[] for _ in range(world_size)]
    for task_cost, task in sorted(((cost(t), t) for t in tasks), key=lambda p: (-p[0], int(p[1][0]))):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        loads[r] += task_cost
        members[r].append(task)
    return members


def _filled(tasks: List[torch.Tensor], cost, world_size: int) -> List[List[torch.Tensor]]:
    """The classes in order, each rank filled up to a capacity before the next: the least capacity that
    fits ``world_size`` ranks (bisection). A class costs its cost alone minus its task's shared part
    (prefix, task prompt), which a rank pays once for each task it holds."""
    items = []  # (task, class, marginal cost, the task's shared cost)
    for t, task in enumerate(tasks):
        alone = [cost(task[i:i + 1]) for i in range(len(task))]
        shared = (sum(alone) - cost(task)) / (len(task) - 1) if len(task) > 1 else alone[0]
        items += [(t, int(c), a - shared, shared) for c, a in zip(task, alone)]

    def fill(capacity: float):
        members, held, load, r = [[] for _ in range(world_size)], set(), 0.0, 0
        for t, c, marginal, shared in items:
            extra = marginal + (0.0 if t in held else shared)
            if members[r] and load + extra > capacity:
                r, held, load, extra = r + 1, set(), 0.0, marginal + shared
                if r == world_size:
                    return None
            members[r].append(c)
            held.add(t)
            load += extra
        return members

    low, high = max(m + s for _, _, m, s in items), sum(m + s for _, _, m, s in items)
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if fill(mid) is not None else (mid, high)
    order = [c for _, c, _, _ in items]
    bounds = [0]
    for m in fill(high):
        bounds.append(bounds[-1] + len(m))
    bounds = _refined(order, bounds, cost)
    return [[torch.tensor(order[a:b], dtype=torch.long)] if b > a else [] for a, b in zip(bounds, bounds[1:])]


def _refined(order: List[int], bounds: List[int], cost, passes: int = 8) -> List[int]:
    """Shift each boundary between neighbouring shares (``order[bounds[r]:bounds[r + 1]]``) one class at a
    time while that lowers the larger of the two shares' exact costs. The fill works from per-class estimates
    (a class's cost alone minus an average shared part), which miss what classes of one task share beyond
    the task's prefix (common leading words of their names): on Plant-6's prompts at 4 ranks the largest
    share goes from 177 to 174 positions, on General-10's at 8 from 1,028 to 1,011."""
    bounds = list(bounds)

    def share_cost(a: int, b: int) -> int:
        return cost(torch.tensor(order[a:b], dtype=torch.long)) if b > a else 0

    for _ in range(passes):
        moved = False
        for r in range(1, len(bounds) - 1):
            if bounds[r - 1] == bounds[r] or bounds[r] == bounds[r + 1]:
                continue  # an empty share stays empty (fewer classes than ranks)
            left, right = share_cost(bounds[r - 1], bounds[r]), share_cost(bounds[r], bounds[r + 1])
            step = -1 if left > right else 1  # give the costlier side's edge class to the other
            while bounds[r - 1] < bounds[r] + step < bounds[r + 1]:
                new_left = share_cost(bounds[r - 1], bounds[r] + step)
                new_right = share_cost(bounds[r] + step, bounds[r + 1])
                if max(new_left, new_right) >= max(left, right):
                    break
                bounds[r] += step
                left, right, moved = new_left, new_right, True
        if not moved:
            break
    return bounds


class ClassShards:
    """Encodes a method's class features split over the ranks of the process group.

    ``features(method, class_index)``: the features of ``class_index`` (default: all classes) on
    this rank. All ranks call it together, each with its own ``class_index`` (the classes of its
    micro-batch's tasks) or all with None; the union of the ranks' classes is what gets encoded.
    """

    def __init__(self, world_size: int, rank: int, cache_size: int = 64):
        self.world_size, self.rank, self.cache_size = world_size, rank, cache_size
        self._plans: OrderedDict = OrderedDict()
        self.gathered_bytes = 0  # received by this rank's forward all-gathers so far
        self.reduced_bytes = 0  # fp32 gradient bytes reduced by their backwards so far
        self.image_bytes = 0  # image-feature rows moved by class-parallel scoring's gathers (all-reduce traffic)
        self.stats_bytes = 0  # softmax statistics moved by class-parallel scoring (all-reduce traffic)

    def plan(self, method, selection: torch.Tensor) -> ShardPlan:
        key = selection.cpu().numpy().tobytes()
        if key not in self._plans:
            selection = selection.cpu()
            device = method.class_task.device
            self._plans[key] = plan_shards(method.class_task.cpu()[selection],
                                           lambda pos: method.text_positions(selection[pos].to(device)),
                                           self.world_size)
            if len(self._plans) > self.cache_size:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return self._plans[key]

    def _union(self, class_index: torch.Tensor, num_classes: int) -> torch.Tensor:
        mask = torch.zeros(num_classes, dtype=torch.float32, device=class_index.device)
        mask[class_index] = 1.0
        return torch.nonzero(D.all_reduce(mask)).flatten()

    def _encode_share(self, method, selection: torch.Tensor):
        """This rank's share of ``selection``: ``(plan, positions in the selection, features, contributes)``."""
        plan = self.plan(method, selection)
        mine = plan.shares[self.rank].to(selection.device)
        contributes = len(mine) > 0
        local = method(selection[mine] if contributes else selection[:1])  # a stand-in keeps ZeRO-3 in step
        return plan, mine, local, contributes

    def features(self, method, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        device = method.class_task.device
        if class_index is None:
            selection = torch.arange(method.num_classes, device=device)
        else:
            selection = self._union(class_index.to(device), method.num_classes)
        plan, _, local, contributes = self._encode_share(method, selection)
        gathered = D.gather_rows(local, plan.sizes, contributes)
        self.gathered_bytes += self.world_size * max(plan.sizes) * local.shape[1] * local.element_size()
        if local.requires_grad:
            self.reduced_bytes += self.world_size * max(plan.sizes) * local.shape[1] * 4
        features = gathered.index_select(0, plan.inverse.to(device))  # selection order
        if class_index is None:
            return features
        return features.index_select(0, column_positions(selection, method.num_classes)[class_index.to(device)])

    def select(self, method, class_index: Optional[torch.Tensor], batch_size: int) -> "StepClasses":
        """The classes every rank's micro-batch needs, for class-parallel scoring (``share_loss.py``); all ranks
        call it together. One all-reduce finds the union of the ranks' ``class_index`` (default: all
        classes), each class's weight in the ranks' average of a per-class loss term, and every rank's
        micro-batch size."""
        device = method.class_task.device
        n, w = method.num_classes, self.world_size
        local = torch.zeros(n + w, dtype=torch.float64, device=device)
        if class_index is None:
            local[:n] = 1.0 / n
        else:
            local[class_index.to(device)] = 1.0 / len(class_index)
        local[n + self.rank] = batch_size
        summed = D.all_reduce(local)
        class_weight, sizes = summed[:n] / w, [int(b) for b in summed[n:].tolist()]
        return StepClasses(torch.nonzero(class_weight).flatten(), class_weight, sizes)

    def share(self, method, step: "StepClasses") -> "Share":
        """This rank's share of ``step``'s classes, encoded; all ranks call it together."""
        _, mine, features, contributes = self._encode_share(method, step.selection)
        ids = step.selection[mine] if contributes else step.selection[:1]  # the stand-in's class: contributes nothing
        return Share(features, ids, contributes, step.class_weight[ids].float(), step.sizes)

    def gather_batch(self, image_features: torch.Tensor, tasks: torch.Tensor, targets: torch.Tensor,
                     sizes: List[int], task_weights: Optional[torch.Tensor] = None) -> ShareBatch:
        """Every rank's micro-batch (image features, tasks, targets as global class ids), in rank order: one
        gather of fp32 rows (``D.all_gather_padded``; ids below 2**24 are exact)."""
        return self.start_batch(image_features, tasks, targets, sizes, task_weights).wait()

    def start_batch(self, image_features: torch.Tensor, tasks: torch.Tensor, targets: torch.Tensor,
                    sizes: List[int], task_weights: Optional[torch.Tensor] = None) -> D.Pending:
        """``gather_batch``, started: its ``ShareBatch`` comes from the returned ``Pending``'s ``wait()``, so
        that the gather runs while the share encodes (nothing of it depends on the text side)."""
        rows = torch.cat([image_features.float(), tasks.unsqueeze(1).float(), targets.unsqueeze(1).float()], dim=1)
        pending = D.start_gather_padded(rows, sizes)
        self.image_bytes += D.all_reduce_traffic(self.world_size * max(sizes) * rows.shape[1] * 4, self.world_size)
        start = sum(sizes[:self.rank])

        def batch() -> ShareBatch:
            gathered = pending.wait()
            tasks_g = gathered[:, -2].long()
            weights = torch.cat([torch.full((b,), 1.0 / (self.world_size * b)) for b in sizes if b]).to(rows.device)
            if task_weights is not None:
                weights = weights * task_weights.to(rows.device)[tasks_g].float()
            return ShareBatch(gathered[:, :-2].to(image_features.dtype), tasks_g, gathered[:, -1].long(), weights,
                              slice(start, start + sizes[self.rank]))
        return D.Pending(None, batch)


@dataclass
class StepClasses:
    """The classes of a class-parallel step (``ClassShards.select``): ``selection`` (global ids, ascending),
    every class's weight in the ranks' average of a per-class loss term ``class_weight [C]``, and every
    rank's micro-batch size."""

    selection: torch.Tensor
    class_weight: torch.Tensor
    sizes: List[int]


@dataclass
class Share:
    """This rank's share for class-parallel scoring: its classes' ``features [C_s, E]`` and global ids
    ``class_ids``, whether it holds any (else ``features`` are a stand-in's), each class's weight in a
    per-class loss term, and every rank's micro-batch size."""

    features: torch.Tensor
    class_ids: torch.Tensor
    contributes: bool
    class_weight: torch.Tensor
    sizes: List[int]


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for backward inside the block -- the activation memory of the
    text side -- once per storage, leaving out tensors that need no gradient and have no history
    (frozen weights, token tables, index tensors)."""

    def __init__(self):
        self.bytes, self._seen = 0, set()
        super().__init__(self._pack, lambda t: t)

    def __enter__(self) -> "SavedBytes":
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad or t.grad_fn is not None:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
        return t


def class_shards(text: TextConfig, world_size: Optional[int] = None, rank: Optional[int] = None
                 ) -> Optional[ClassShards]:
    """The class sharding ``text.shard`` asks for in this process group (``auto``: on with more than
    one rank), or None: every rank encodes every class."""
    world_size = D.world_size() if world_size is None else world_size
    if text.shard == "off" or world_size == 1:
        return None
    return ClassShards(world_size, D.rank() if rank is None else rank)
