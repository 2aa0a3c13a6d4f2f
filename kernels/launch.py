"""Launch settings of every kernel, per GPU target, dtype and shape: the one table the dispatchers and the
compile check (``softcpt_dist.kernels.compile_check``) share.

A target is a CUDA compute capability as an integer (80 = A100, 86 = A10 / RTX 30, 89 = L4 / L40S / RTX 40,
90 = H100 / H200, 100 = B200); ``None`` is Triton's interpreter on the CPU, which pays per operation, not
per element, and gets fewer, larger tiles. Why each row is what it is (ptxas's numbers for every launch:
``softcpt-dist kernels check``, the table in docs/results.md):

- fp32 products are exact (``ieee``: FMA, no tensor cores), so operands and accumulators live in registers:
  at head dim 80-128 (a 128-wide tile) 8 warps share them and both kernels step 16 keys at a time (the
  key kernel with one stage), which keeps them inside the 99 KB of shared memory of sm_86/sm_89 and free of
  spills;
- 16-bit attention takes 32-row tiles (``mma.sync``) on every target: a tile of consecutive layout nodes is
  mostly other classes' suffixes, masked, and a larger tile carries more of them. ``warpgroup=True`` gives
  sm_90 and later 64-row tiles with whole warpgroups, for which the compiler emits warpgroup MMA (``wgmma``);
  on an H200 at the ViT-L-14 General-10 shape (bf16) they were the slower (docs/results.md), so they are
  not the default;
- the loss's 16-bit sample tiles are 64 rows on sm_90+, with warpgroup MMA for the logits (its rows are
  samples, none masked; its dlogit products stay fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from softcpt_dist.kernels._triton import block, interpreting

# Shared memory one block may use (bytes, with the opt-in carve-out), per target.
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448}
WARPGROUP_MMA_FROM = 90  # the first target with warpgroup MMA (Hopper); Blackwell keeps 64-row tiles


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch: a tile of ``rows`` x ``cols`` (each kernel says which it iterates), warps, stages."""

    rows: int
    cols: int
    num_warps: int = 4
    num_stages: int = 3

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class AttentionLaunch:
    """``query``: query nodes per program x key nodes per step (forward and dQ, one tile plan);
    ``key``: query nodes per step x key nodes per program (dK and dV)."""

    query: Tiles
    key: Tiles


@dataclass(frozen=True)
class LossLaunch:
    """Samples per tile, classes per step, embedding chunk, and the warps and stages of every loss kernel."""

    samples: int
    classes: int
    chunk: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


def _sixteen_bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def attention_launch(dtype: torch.dtype, head_dim: int, target: Optional[int],
                     warpgroup: bool = False) -> AttentionLaunch:
    """The shared-prefix attention's tiles for ``dtype`` qkv of ``head_dim`` on ``target``; ``warpgroup``:
    64-row warpgroup-MMA tiles for 16-bit qkv on sm_90 and later (elsewhere ignored)."""
    width = block(head_dim)
    if target is None:
        return AttentionLaunch(Tiles(64, 64), Tiles(64, 64))
    if _sixteen_bit(dtype) and warpgroup and target >= WARPGROUP_MMA_FROM:
        if width <= 64:
            return AttentionLaunch(Tiles(64, 64, 4), Tiles(64, 64, 4))
        if width <= 128:
            return AttentionLaunch(Tiles(64, 64, 8), Tiles(32, 64, 8))
        return AttentionLaunch(Tiles(32, 32, 8), Tiles(16, 32, 8, 1))
    if _sixteen_bit(dtype):
        if width <= 64:
            return AttentionLaunch(Tiles(32, 32, 4), Tiles(32, 32, 4))
        if width <= 128:  # two stages: with three the query kernel spills a few bytes on sm_90/sm_100
            return AttentionLaunch(Tiles(32, 32, 4, 2), Tiles(32, 32, 4))
        return AttentionLaunch(Tiles(32, 32, 8), Tiles(16, 32, 8, 1))
    if width <= 64:
        return AttentionLaunch(Tiles(32, 32, 8), Tiles(32, 32, 8, 1))
    if width <= 128:
        return AttentionLaunch(Tiles(32, 16, 8), Tiles(32, 16, 8, 1))
    return AttentionLaunch(Tiles(16, 16, 8, 1), Tiles(16, 16, 8, 1))


def loss_launch(dtype: torch.dtype, dim: int, target: Optional[int]) -> LossLaunch:
    """The fused cosine cross-entropy's tiles for ``dtype`` features of ``dim`` on ``target``."""
    classes = 32 if dim <= 512 else 16
    if target is None:
        return LossLaunch(16, classes)
    if _sixteen_bit(dtype) and target >= WARPGROUP_MMA_FROM:
        return LossLaunch(64, 32)
    return LossLaunch(16, classes)


def device_target(device: torch.device) -> Optional[int]:
    """The target a launch on ``device`` compiles for (``None``: the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
