"""Model FLOPs of a training step, counted from the model and the work it did, and device peaks for MFU.

Matrix products only (layer norms, softmax, GELU are a few percent and not counted, as is usual for
MFU); activation-checkpointing recomputation is not counted (model FLOPs, not hardware FLOPs). A
product of an ``[r, i]`` input with an ``[i, o]`` weight costs ``2 r i o``. Per step and rank:

* text (frozen): each encoded token position passes every block's weights once, ``2 W`` forward and
  ``2 W`` backward (input gradients only: frozen weights get none), ``W`` the blocks' weight elements
  (q/k/v, output, MLP). Attention costs ``4 d`` per (query, key) pair and layer forward (scores and
  values) and ``8 d`` backward (their four gradient products); the shared-prefix layout counts only
  the pairs a node really attends (its ancestors and itself), the dense path ``L (L + 1) / 2`` per
  prompt. Each feature is projected: ``2 d E`` forward, ``2 d E`` backward.
* the meta network (learnable; its linear layers on ``r`` real rows): ``2 r i o`` forward, ``2 r i o``
  backward for the weight gradient plus ``2 r i o`` for the input gradient (the first layer's only when
  its input needs one: the task feature of learnable task context).
* head: cosine logits of ``B`` images against ``C`` classes, ``2 B C E`` forward and ``2 B C E``
  backward (class-feature gradients; cached image features need none).
* image (frozen, no gradients): one forward per image, counted once by torch's ``FlopCounterMode``
  on a real batch (any tower: ViT or ResNet); zero for cached features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn

from softcpt_dist.model.meta_net import MetaNet
from softcpt_dist.training.engine import full_numel

# Dense peak TFLOP/s by (device-name substring, precision); the first match wins (more specific first).
# fp32 is the CUDA-core rate (torch leaves TF32 matmuls off by default). Override with --peak-tflops.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """The table's dense peak for this device and precision, or None (CPUs, unknown devices)."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


@dataclass(frozen=True)
class TextShape:
    """What the text FLOPs depend on: layers, width, the blocks' weight elements, projection size."""

    layers: int
    width: int
    block_weights: int  # all blocks together
    out_dim: int

    @classmethod
    def of(cls, encoder) -> "TextShape":
        weights = 0
        for block in encoder.blocks:
            weights += full_numel(block.attn.in_proj_weight) + full_numel(block.attn.out_proj.weight)
            weights += sum(full_numel(m.weight) for m in block.mlp.modules() if isinstance(m, nn.Linear))
        return cls(len(encoder.blocks), encoder.width, weights, encoder.output_dim)


@dataclass
class TextWork:
    """Text-side work done: token positions and attention pairs (per layer), projected features."""

    positions: int = 0
    pairs: int = 0
    features: int = 0

    @classmethod
    def of(cls, encoder) -> "TextWork":
        return cls(encoder.positions_encoded, encoder.pairs_encoded, encoder.features_encoded)

    def __sub__(self, other: "TextWork") -> "TextWork":
        return TextWork(self.positions - other.positions, self.pairs - other.pairs, self.features - other.features)


def text_flops(shape: TextShape, work: TextWork) -> Dict[str, int]:
    """Forward and backward FLOPs of encoding ``work`` through a frozen text tower of ``shape``."""
    proj = 2 * shape.width * shape.out_dim * work.features
    attention = 4 * shape.width * shape.layers * work.pairs
    weights = 2 * shape.block_weights * work.positions
    return {"forward": weights + attention + proj, "backward": weights + 2 * attention + proj}


class LinearCounter:
    """Counts the FLOPs of the meta networks of ``module`` as they run, on their real rows (``rowwise``
    pads small products with zero rows, which are not model FLOPs)."""

    def __init__(self, module: nn.Module):
        self.forward = self.backward = 0
        self._hooks = [m.register_forward_hook(self._count) for m in module.modules() if isinstance(m, MetaNet)]

    def _count(self, net: nn.Module, inputs, output) -> None:
        if not torch.is_grad_enabled():
            return
        x = inputs[0]
        rows = x.numel() // x.shape[-1]
        sizes = [layer.in_features * layer.out_features for layer in net.modules() if isinstance(layer, nn.Linear)]
        self.forward += 2 * rows * sum(sizes)
        # Weight gradients of every layer; input gradients of all but the first, and of the first when its
        # input (the task feature of learnable task context) needs one.
        inputs_grad = sum(sizes[1:]) + (sizes[0] if x.requires_grad and sizes else 0)
        self.backward += 2 * rows * (sum(sizes) + inputs_grad)

    def total(self) -> Dict[str, int]:
        return {"forward": self.forward, "backward": self.backward}

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def head_flops(batch: int, classes: int, dim: int) -> Dict[str, int]:
    """Cosine logits of ``batch`` images against ``classes`` class features of width ``dim``."""
    flops = 2 * batch * classes * dim
    return {"forward": flops, "backward": flops}


def _attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """Scores and values: ``4 s_q s_k d`` per batch and head (as torch counts its CUDA attention)."""
    *batch, s_q, d = query_shape
    heads = 1
    for n in batch:
        heads *= n
    return 2 * heads * s_q * key_shape[-2] * d + 2 * heads * s_q * key_shape[-2] * value_shape[-1]


def _uncounted_attention() -> Dict:
    """Attention ops torch's FLOP counter has no formula for (the CPU flash attention)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _attention_flops} if op is not None else {}


def image_flops_per_sample(backbone, images: torch.Tensor) -> int:
    """Forward FLOPs of the frozen image encoder per image, counted by torch on one real batch ``[B, C, H, W]``."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False, custom_mapping=_uncounted_attention())
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel is invisible to the counter
    try:
        with torch.no_grad(), counter:
            backbone.image_encoder(images.to(backbone.device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops()) // max(images.shape[0], 1)


@dataclass
class StepFlops:
    """One step's FLOPs on one rank, by part and pass."""

    parts: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(sum(p.values()) for p in self.parts.values())

