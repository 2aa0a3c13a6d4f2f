"""The class-parallel cost model (``softcpt_dist.scaling``) for General-10 (1,191 classes) with ViT-L-14.

1. Measures the per-token cost of the text side here: forward + backward (input gradients only) of
   SoftCPT NATA's class features for Plant-6 through the ViT-L-14 text tower (random init, fp32,
   shared-prefix path), seconds per encoded token position.
2. Plans General-10 (its shape: ``group_shapes.general10``) at each world size with the real planner
   and prints the predicted step for two settings: this machine's measured per-token cost, and an
   H200 one derived from FLOPs (stated assumptions: no GPU measured it).

    python benchmarks/scaling_model.py                      # ~1 min on 2 CPU cores
    python benchmarks/scaling_model.py --token-us 0.9       # your own measured per-token cost (us)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import softcpt_dist  # noqa: E402,F401  (the torchvision shim first)
import torch  # noqa: E402

from group_shapes import general10, plant6  # noqa: E402
from softcpt_dist.config import MethodConfig, ModelConfig, PromptConfig  # noqa: E402
from softcpt_dist.model import build_backbone, build_method  # noqa: E402
from softcpt_dist.scaling import Link, predict_scaling  # noqa: E402

WORLDS = (1, 2, 8, 64, 512)
NVLINK, INFINIBAND = Link(300.0, 5.0), Link(50.0, 10.0)  # per-GPU all-gather bandwidth (GB/s), hop latency (us)


def measure_token_cost(backbone, repeats: int = 2) -> float:
    method = build_method(backbone, plant6(), MethodConfig(variant="NATA"), PromptConfig())
    encoder, times = backbone.text_encoder, []
    for i in range(repeats + 1):
        before, t0 = encoder.positions_encoded, time.perf_counter()
        method().float().square().sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
        positions = encoder.positions_encoded - before
    return statistics.median(times) / positions


def flop_token_cost(width: int, layers: int, peak_tflops: float, mfu: float) -> float:
    """Matmul FLOPs per position: 24 d^2 a layer forward (qkv, out, 4x MLP), as much again backward for
    the input gradients (frozen weights need no weight gradients)."""
    return 2 * 24 * width ** 2 * layers / (peak_tflops * 1e12 * mfu)


def table(title: str, rows) -> str:
    lines = [f"**{title}**", "",
             "| ranks | positions (slowest rank) | text ms | gather KiB | gather ms | grad all-reduce ms | step ms | "
             "speedup | efficiency |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.world_size} | {r.positions:,} | {r.text_s * 1e3:.2f} | {r.gather_bytes / 2**10:,.0f} | "
                     f"{r.gather_s * 1e3:.2f} | {r.reduce_s * 1e3:.2f} | {r.step_s * 1e3:.2f} | {r.speedup:.1f}x | {100 * r.efficiency:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-L-14")
    p.add_argument("--token-us", type=float, default=None, help="skip the measurement: per-token cost in us")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(arch=args.arch))
    text = backbone.text_encoder
    measured = args.token_us * 1e-6 if args.token_us else measure_token_cost(backbone)
    method = build_method(backbone, general10(), MethodConfig(variant="NATA"), PromptConfig())
    layers, width = len(text.blocks), text.width
    learnable = sum(p.numel() for p in method.learnable_parameters().values())
    print(f"# {args.arch} text tower ({layers} layers, width {width}), SoftCPT NATA, General-10 shape "
          f"({method.num_classes} classes, {learnable:,} learnable elements), all classes every step; torch "
          f"{torch.__version__}\n")
    cpu = predict_scaling(method, WORLDS, measured, Link(10.0, 20.0), feature_bytes=4)
    print(table(f"Measured here: {measured * 1e6:.0f} us per token position (fp32, {args.threads} CPU threads); "
                "links of 10 GB/s, 20 us", cpu) + "\n")
    # H200: 989 dense bf16 TFLOPS; 40% of it on the large packed GEMMs; a text pass takes >= 2 encoder calls
    # x layers x ~20 kernels (forward + backward) x 4 us of launch and sync however small its share.
    gpu_token = flop_token_cost(width, layers, 989.0, 0.4)
    floor = 2 * layers * 20 * 4e-6
    gpu = [predict_scaling(method, [1, w], gpu_token, NVLINK if w <= 8 else INFINIBAND, kernel_floor_s=floor,
                           fixed_s=1e-3)[-1] for w in WORLDS]
    for r in gpu:
        r.speedup, r.efficiency = gpu[0].step_s / r.step_s, gpu[0].step_s / r.step_s / r.world_size
    print(table(f"Assumed H200 (bf16): {gpu_token * 1e6:.2f} us per position (FLOPs at 40% of 989 TFLOPS), "
                f"{floor * 1e3:.1f} ms kernel floor, 1 ms rest of step; NVLink {NVLINK.bandwidth_gb_s:.0f} GB/s "
                f"{NVLINK.latency_us:.0f} us up to 8 ranks, InfiniBand {INFINIBAND.bandwidth_gb_s:.0f} GB/s "
                f"{INFINIBAND.latency_us:.0f} us beyond", gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
