"""A cost model of class-parallel text encoding: what W ranks buy on a text-bound step, on paper.

One step's text side on W ranks (``model/class_shards.py``): every rank encodes its share of the
class prompts (forward, and backward for the input gradients only: CLIP is frozen), all-gathers the
features and reduce-scatters their gradients. So, for the slowest rank::

    text_s   = max(max_r positions_r * token_s, kernel_floor_s)
    gather_s = 2 (W - 1) latency + (W - 1) rows E (feature bytes + 4) / bandwidth   (ring; fwd + bwd)
    reduce_s = 2 (W - 1) latency + 2 (W - 1) / W * 4 * learnable / bandwidth       (ring all-reduce)
    step_s   = text_s + gather_s + reduce_s + fixed_s

``positions_r`` comes from the real planner on the real prompts (a share pays its tasks' shared
prefixes and task prompts once each, so shares stop shrinking once tasks are split into a few
classes each); ``rows`` is the largest share's class count (the gather pads to it); the gradient is
reduced in fp32 (4 bytes), the features gathered in the model's precision; ``reduce_s`` is
DeepSpeed's all-reduce of the learnable tensors' fp32 gradients (data parallelism's own cost: the
meta network is most of it). ``kernel_floor_s`` is
the time a text pass takes however small its share (on a GPU: the launches of its ~20 kernels per
layer); ``fixed_s`` the rest of a step (loss, optimizer, the few small all-reduces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from softcpt_dist.model.class_shards import plan_shards
from softcpt_dist.training.engine import full_numel


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
    gather_bytes: int  # received per rank per step: features (forward) + fp32 gradients (backward)
    gather_s: float
    reduce_s: float  # the learnable gradients' all-reduce
    step_s: float
    speedup: float = 1.0  # vs. the first world size estimated
    efficiency: float = 1.0  # speedup / (world_size / first world size)


def step_estimate(shares: Sequence[int], rows: int, feature_dim: int, learnable: int, token_s: float, link: Link, *,
                  feature_bytes: int = 2, kernel_floor_s: float = 0.0, fixed_s: float = 0.0) -> StepEstimate:
    """The step of one plan: ``shares`` token positions per rank, ``rows`` classes in the largest share,
    ``learnable`` elements of learnable tensors."""
    world = len(shares)
    text_s = max(max(shares) * token_s, kernel_floor_s)
    if world == 1:
        return StepEstimate(1, max(shares), text_s, 0, 0.0, 0.0, text_s + fixed_s)
    hop, bandwidth = link.latency_us * 1e-6, link.bandwidth_gb_s * 1e9
    received = (world - 1) * rows * feature_dim * (feature_bytes + 4)  # ring: all blocks but one's own
    gather_s = 2 * (world - 1) * hop + received / bandwidth
    reduce_s = 2 * (world - 1) * hop + 2 * (world - 1) / world * 4 * learnable / bandwidth
    return StepEstimate(world, max(shares), text_s, received, gather_s, reduce_s,
                        text_s + gather_s + reduce_s + fixed_s)


def predict_scaling(method, world_sizes: Sequence[int], token_s: float, link: Link, *, feature_bytes: int = 2,
                    kernel_floor_s: float = 0.0, fixed_s: float = 0.0) -> List[StepEstimate]:
    """Estimates for ``method`` (a built prompt method: its prompts are planned exactly as in training,
    all classes per step) at each world size."""
    all_classes = torch.arange(method.num_classes, device=method.class_task.device)
    learnable = sum(full_numel(p) for p in method.learnable_parameters().values())
    out = []
    for world in world_sizes:
        plan = plan_shards(method.class_task.cpu(), lambda pos: method.text_positions(all_classes[pos]), world)
        est = step_estimate(plan.costs, max(plan.sizes), method.backbone.embed_dim, learnable, token_s, link,
                            feature_bytes=feature_bytes, kernel_floor_s=kernel_floor_s, fixed_s=fixed_s)
        if out:
            est.speedup = out[0].step_s / est.step_s
            est.efficiency = est.speedup * world_sizes[0] / world
        out.append(est)
    return out
