"""A cost model of class-parallel text encoding: what W ranks buy on a text-bound step, on paper.

One step's text side on W ranks (``model/class_shards.py``): every rank encodes its share of the
class prompts (forward, and backward for the input gradients only: CLIP is frozen), and the ranks
exchange what scoring and the learnable gradients need. For the slowest rank::

    text_s   = max(max_r positions_r * token_s, kernel_floor_s)
    score_s  = 2 (W - 1) latency + score_bytes / bandwidth
    grad_s   = collectives x (W - 1) latency + grad_bytes / bandwidth
    step_s   = text_s + score_s + grad_s + fixed_s

with, per rank and step (ring collectives: an all-gather receives the W - 1 other blocks, an
all-reduce moves 2 (W - 1) / W of the tensor):

- ``scoring="gathered"`` (``text.scoring=gathered``): the class features all-gathered and their fp32
  gradients reduced back: ``(W - 1) rows E (feature bytes + 4)``, ``rows`` the largest share's classes;
- ``scoring="shares"`` (class-parallel scoring, ``model/share_loss.py``): every rank's micro-batch of
  ``batch`` image features with task and target, ``(W - 1) batch (E + 2) 4``, and 4 softmax numbers per
  sample of the global batch, ``(W - 1) (4 W batch + 1) 4``;
- ``factors=None``: DeepSpeed all-reduces every learnable fp32 gradient, ``2 (W - 1) / W 4 learnable``
  (2 (W - 1) latencies);
- ``factors=(keys, out, in)`` (``engine.gradient_exchange=structured``): the meta network's ``out x in``
  weight gradient as its factor table, one row of ``out + in + 1`` numbers per task (per class for the
  class-aware variants), where that is smaller than the matrix, all-reduced with the rest in the same
  one all-reduce: ``2 (W - 1) / W 4 (keys (out + in + 1) + rest)``; ``rest`` leaves out the rows of
  per-class and per-task tensors that one rank's share alone reads (``predict_scaling``: ``kept_rows``).

``positions_r`` comes from the real planner on the real prompts (a share pays its tasks' shared
prefixes and task prompts once each, so shares stop shrinking once tasks are split into a few
classes each). ``kernel_floor_s`` is the time a text pass takes however small its share (on a GPU:
the launches of its ~20 kernels per layer); ``fixed_s`` the rest of a step (loss, optimizer, the small
all-reduce that finds the step's classes).

Left out: the scoring arithmetic itself (global batch x share x E multiply-adds, far below the text
side's), overlap of communication with computation (none is assumed), tree or hierarchical
collectives (NCCL's latency grows as log W there, not W), and the stragglers and jitter of a real
cluster; the ring's latency term makes the model pessimistic at hundreds of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from softcpt_dist.model.class_shards import ShardPlan, plan_shards
from softcpt_dist.training.engine import full_numel
from softcpt_dist.training.gradient_exchange import owned_rows


@dataclass(frozen=True)
class Link:
    """An interconnect as the collectives see it: per-rank bandwidth (GB/s) and per-hop latency (us)."""

    bandwidth_gb_s: float
    latency_us: float


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
                  scoring: str = "gathered", batch: int = 0,
                  factors: Optional[Tuple[int, int, int]] = None) -> StepEstimate:
    """The step of one plan: ``shares`` token positions per rank, ``rows`` classes in the largest share,
    ``learnable`` elements of learnable tensors; ``batch`` images per rank (``scoring="shares"``);
    ``factors``: ``(keys, out, in)`` of the meta network's exchange by factors (None: DeepSpeed's)."""
    world = len(shares)
    text_s = max(max(shares) * token_s, kernel_floor_s)
    if world == 1:
        return StepEstimate(1, max(shares), text_s, 0, 0.0, 0.0, text_s + fixed_s)
    hop, bandwidth = link.latency_us * 1e-6, link.bandwidth_gb_s * 1e9
    image = stats = 0
    if scoring == "shares":
        image = (world - 1) * batch * (feature_dim + 2) * 4
        stats = (world - 1) * (4 * world * batch + 1) * 4
        received = image + stats
    elif scoring == "gathered":
        received = (world - 1) * rows * feature_dim * (feature_bytes + 4)  # ring: all blocks but one's own
    else:
        raise ValueError(f"scoring={scoring!r}: shares or gathered")
    gather_s = 2 * (world - 1) * hop + received / bandwidth
    ring = 2 * (world - 1) / world * 4
    factor, reduced = 0, learnable
    if factors is not None:
        keys, out, inp = factors
        if keys * (out + inp + 1) < out * inp:
            factor, reduced = int(ring * keys * (out + inp + 1)), learnable - out * inp
    allreduce = int(ring * reduced)
    reduce_s = 2 * (world - 1) * hop + (factor + allreduce) / bandwidth
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
    factors = (meta.key_count, *meta.net.weight.shape) if meta is not None else None
    out = []
    for world in world_sizes:
        plan = plans[world] if plans and world in plans else plan_all_classes(method, world)
        sent = learnable - kept_rows(method, plan) if structured else learnable
        est = step_estimate(plan.costs, max(plan.sizes), method.backbone.embed_dim, sent, token_s,
                            link(world) if callable(link) else link,
                            feature_bytes=feature_bytes, kernel_floor_s=kernel_floor_s, fixed_s=fixed_s,
                            scoring=scoring, batch=max(1, -(-global_batch // world)), factors=factors)
        if out:
            est.speedup = out[0].step_s / est.step_s
            est.efficiency = est.speedup * world_sizes[0] / world
        out.append(est)
    return out
