"""A cost model of class-parallel text encoding: what W ranks buy on a text-bound step, on paper.

One step's text side on W ranks (``model/class_shards.py``): every rank encodes its share of the
class prompts (forward, and backward for the input gradients only: CLIP is frozen), and the ranks
exchange what scoring and the learnable gradients need. For the slowest rank::

    text_s   = max(max_r positions_r * token_s, kernel_floor_s)
    score_s  = latency of the scoring collectives + score_bytes / bandwidth (less what overlaps the text)
    grad_s   = latency of one all-reduce + grad_bytes / bandwidth
    step_s   = text_s + score_s + grad_s + fixed_s

Latency is hops x the link's per-hop latency, as NCCL's own tuning model counts them
(``src/graph/tuning.cc``): a ring all-gather or reduce-scatter takes ``W - 1`` hops, a ring all-reduce
``2 (W - 1)``, a tree all-reduce ``2 ((ranks per node - 1) + log2 nodes)`` (a chain inside a node, a
binary tree across nodes); an all-reduce takes the fewer (within one node both are the same). Bytes per
rank and step:

- ``scoring="gathered"`` (``text.scoring=gathered``): the class features all-gathered and their fp32
  gradients reduce-scattered back (ring, ``2 (W - 1)`` hops): ``(W - 1) rows E (feature bytes + 4)``,
  ``rows`` the largest share's classes;
- ``scoring="shares"`` (class-parallel scoring, ``model/share_loss.py``): two all-reduces of zero-filled
  buffers (``distributed.gather_by_sum``): every rank's micro-batch of ``batch`` image features with task
  and target, ``W batch (E + 2) 4`` bytes, then 4 softmax numbers per sample of the global batch,
  ``W (4 W batch + 1) 4``; each moves ``2 (W - 1) / W`` times its buffer. The images' all-reduce runs
  while the share's forward encodes (half of ``text_s``: the input-gradient backward has the same
  matmuls), so only what exceeds that half counts;
- ``factors=None``: DeepSpeed all-reduces every learnable fp32 gradient, ``2 (W - 1) / W 4 learnable``;
- ``factors=(table, matrix)`` (``engine.gradient_exchange=structured``): the meta network's ``out x in``
  weight gradient as its factor table (``MetaNet.factor_elements``: one row of ``out + in + 1`` numbers
  per task; for the class-aware variants' ``[class | task]`` rows a row per task plus the class part's
  matrix), where that is smaller than the matrix, all-reduced with the rest in the same one all-reduce:
  ``2 (W - 1) / W 4 (table + rest)``; ``rest`` leaves out the rows of
  per-class and per-task tensors that one rank's share alone reads (``predict_scaling``: ``kept_rows``).

``positions_r`` comes from the real planner on the real prompts (a share pays its tasks' shared
prefixes and task prompts once each, so shares stop shrinking once tasks are split into a few
classes each). ``kernel_floor_s`` is the time a text pass takes however small its share (on a GPU:
the launches of its ~20 kernels per layer); ``fixed_s`` the rest of a step (loss, optimizer, the small
all-reduce that finds the step's classes).

Left out: the scoring arithmetic itself (global batch x share x E multiply-adds, far below the text
side's), overlap of communication with computation (none is assumed), NCCL's fixed per-call base
latency and its faster protocols inside a node (every hop costs the link's one latency), and the
stragglers and jitter of a real cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from softcpt_dist.distributed import all_reduce_traffic
from softcpt_dist.model.class_shards import ShardPlan, plan_shards
from softcpt_dist.training.engine import full_numel
from softcpt_dist.training.gradient_exchange import owned_rows


@dataclass(frozen=True)
class Link:
    """An interconnect as the collectives see it: per-rank bandwidth (GB/s), per-hop latency (us), and
    the ranks of a node (a tree all-reduce chains them, ``all_reduce_hops``; 0: rings only, as gloo runs)."""

    bandwidth_gb_s: float
    latency_us: float
    ranks_per_node: int = 8


def all_reduce_hops(world: int, ranks_per_node: int) -> int:
    """Hops of an all-reduce over ``world`` ranks: the ring's ``2 (W - 1)`` or the tree's
    ``2 ((ranks per node - 1) + log2 nodes)``, whichever is fewer (NCCL picks by the same count)."""
    if world <= 1:
        return 0
    if ranks_per_node <= 0:
        return 2 * (world - 1)
    per_node = min(world, ranks_per_node)
    nodes = -(-world // per_node)
    return min(2 * (world - 1), 2 * ((per_node - 1) + math.ceil(math.log2(nodes))))


@dataclass
class StepEstimate:
    world_size: int
    positions: int  # the slowest rank's token positions
    text_s: float
    gather_bytes: int  # received per rank per step for scoring: class features + their gradients, or images + statistics
    gather_s: float
    reduce_s: float  # the learnable gradients' exchange
    step_s: float
    speedup: float = 1.0  # vs. the first world size estimated
    efficiency: float = 1.0  # speedup / (world_size / first world size)
    image_bytes: int = 0  # of gather_bytes: image features with tasks and targets (scoring="shares")
    stats_bytes: int = 0  # of gather_bytes: softmax statistics (scoring="shares")
    factor_bytes: int = 0  # the meta network's gradient factors (structured exchange)
    allreduce_bytes: int = 0  # learnable gradients all-reduced (ring traffic per rank)


def step_estimate(shares: Sequence[int], rows: int, feature_dim: int, learnable: int, token_s: float, link: Link, *,
                  feature_bytes: int = 2, kernel_floor_s: float = 0.0, fixed_s: float = 0.0,
                  scoring: str = "gathered", batch: int = 0, sample_stats: int = 4,
                  factors: Optional[Tuple[Optional[int], int]] = None) -> StepEstimate:
    """The step of one plan: ``shares`` token positions per rank, ``rows`` classes in the largest share,
    ``learnable`` elements of learnable tensors; ``batch`` images per rank and ``sample_stats`` numbers per
    sample and share in the statistics' gather (``scoring="shares"``: 4, plus a method's own);
    ``factors``: ``(numbers of its factor table, of its matrix)`` for the meta network's exchange by factors
    (``MetaNet.factor_elements``; None: DeepSpeed's)."""
    world = len(shares)
    text_s = max(max(shares) * token_s, kernel_floor_s)
    if world == 1:
        return StepEstimate(1, max(shares), text_s, 0, 0.0, 0.0, text_s + fixed_s)
    hop, bandwidth = link.latency_us * 1e-6, link.bandwidth_gb_s * 1e9
    reduce_hops = all_reduce_hops(world, link.ranks_per_node)
    image = stats = 0
    if scoring == "shares":  # two all-reduces of zero-filled buffers; the images' runs during the share's forward
        image = all_reduce_traffic(world * batch * (feature_dim + 2) * 4, world)
        stats = all_reduce_traffic(world * (sample_stats * world * batch + 1) * 4, world)
        received = image + stats
        image_s = reduce_hops * hop + image / bandwidth
        gather_s = max(0.0, image_s - text_s / 2) + reduce_hops * hop + stats / bandwidth
    elif scoring == "gathered":  # a ring all-gather, a ring reduce-scatter back
        received = (world - 1) * rows * feature_dim * (feature_bytes + 4)
        gather_s = 2 * (world - 1) * hop + received / bandwidth
    else:
        raise ValueError(f"scoring={scoring!r}: shares or gathered")
    factor, reduced = 0, learnable
    if factors is not None:
        table, matrix = factors
        if table is not None and table < matrix:
            factor, reduced = all_reduce_traffic(4 * table, world), learnable - matrix
    allreduce = all_reduce_traffic(4 * reduced, world)
    reduce_s = reduce_hops * hop + (factor + allreduce) / bandwidth
    return StepEstimate(world, max(shares), text_s, received, gather_s, reduce_s,
                        text_s + gather_s + reduce_s + fixed_s, image_bytes=image, stats_bytes=stats,
                        factor_bytes=factor, allreduce_bytes=allreduce)


def meta_net(method):
    """``method``'s linear meta network with keyed rows (exchanged by factors), or None."""
    from softcpt_dist.model.meta_net import MetaNet
    nets = [m for m in method.modules() if isinstance(m, MetaNet) and m.kind == "lin" and m.key_count]
    return nets[0] if nets else None


def plan_all_classes(method, world_size: int) -> ShardPlan:
    """The planner's shares of all of ``method``'s classes over ``world_size`` ranks (as training plans them)."""
    all_classes = torch.arange(method.num_classes, device=method.class_task.device)
    return plan_shards(method.class_task.cpu(), lambda pos: method.text_positions(all_classes[pos]), world_size)


def kept_rows(method, plan: ShardPlan) -> int:
    """Learnable elements in rows read by one rank's share of ``plan`` (``Method.class_rows``): the structured
    exchange keeps them on their owner (``training/gradient_exchange.py``)."""
    learnable = method.learnable_parameters()
    kept = 0
    for name, class_row in method.class_rows().items():
        rows = owned_rows(learnable[name], class_row, plan.shares, 0)
        kept += len(rows.owned) * learnable[name][0].numel()
    return kept


def predict_scaling(method, world_sizes: Sequence[int], token_s: float, link, *, feature_bytes: int = 2,
                    kernel_floor_s: float = 0.0, fixed_s: float = 0.0, scoring: str = "gathered",
                    global_batch: int = 32, structured: bool = False,
                    plans: Optional[Dict[int, ShardPlan]] = None) -> List[StepEstimate]:
    """Estimates for ``method`` (a built prompt method: its prompts are planned exactly as in training,
    all classes per step) at each world size; ``global_batch`` images a step (``scoring="shares"``: each
    rank's ``global_batch / W`` are gathered); ``structured``: the meta network's gradient by factors (one
    row per task, per class for class-aware variants). ``link``: a ``Link``, or a function of the world
    size giving one; ``plans``: ``plan_all_classes`` by world size, where already made (planning thousands
    of classes takes a while)."""
    learnable = sum(full_numel(p) for p in method.learnable_parameters().values())
    meta = meta_net(method) if structured else None
    factors = (meta.factor_elements(), meta.net.weight.numel()) if meta is not None else None
    out = []
    for world in world_sizes:
        plan = plans[world] if plans and world in plans else plan_all_classes(method, world)
        sent = learnable - kept_rows(method, plan) if structured else learnable
        est = step_estimate(plan.costs, max(plan.sizes), method.backbone.embed_dim, sent, token_s,
                            link(world) if callable(link) else link,
                            feature_bytes=feature_bytes, kernel_floor_s=kernel_floor_s, fixed_s=fixed_s,
                            scoring=scoring, batch=max(1, -(-global_batch // world)),
                            sample_stats=4 + method.share_statistics, factors=factors)
        if out:
            est.speedup = out[0].step_s / est.step_s
            est.efficiency = est.speedup * world_sizes[0] / world
        out.append(est)
    return out
