"""The class-parallel cost model (``softcpt_dist.scaling``) for General-10 (1,191 classes) and a generated
group of 100 tasks x 100 classes, with ViT-L-14.

1. Measures the per-token cost of the text side here: forward + backward (input gradients only) of
   SoftCPT NATA's class features for Plant-6 through the ViT-L-14 text tower (random init, fp32,
   shared-prefix path), seconds per encoded token position.
2. Plans each group at each world size with the real planner and prints the predicted step, side by
   side for the former exchange (class features gathered, every gradient all-reduced by DeepSpeed) and
   the current one (class-parallel scoring, the meta network's gradient by factors): with this machine's
   measured per-token cost for General-10, and for both groups with an H200 one derived from FLOPs
   (stated assumptions: no GPU measured it). Then the bytes per step by kind at 8 ranks.
3. The 64-rank efficiencies side by side: the former exchange with rings only (every all-reduce a ring,
   as the model counted before tree all-reduces), the former exchange and the current one.

    python benchmarks/scaling_model.py                      # ~2 min on 2 CPU cores
    python benchmarks/scaling_model.py --token-us 0.9       # your own measured per-token cost (us)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import softcpt_dist  # noqa: E402,F401  (the torchvision shim first)
import torch  # noqa: E402

from group_shapes import general10, large_group, plant6  # noqa: E402
from softcpt_dist.config import MethodConfig, ModelConfig, PromptConfig  # noqa: E402
from softcpt_dist.model import build_backbone, build_method  # noqa: E402
from softcpt_dist.scaling import Link, plan_all_classes, predict_scaling  # noqa: E402

WORLDS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
GLOBAL_BATCH = 32  # images a step; each rank gets ceil(32 / W), at least 1
FORMER = {"scoring": "gathered", "structured": False}
CURRENT = {"scoring": "shares", "structured": True}
# per-GPU bandwidth (GB/s), hop latency (us), 8 GPUs a node (NCCL's tree all-reduce across nodes)
NVLINK, INFINIBAND = Link(300.0, 5.0, 8), Link(50.0, 10.0, 8)


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
             "| ranks | positions (slowest rank) | text ms | scoring KiB | scoring ms | gradients KiB | gradients ms | "
             "step ms | speedup | efficiency |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.world_size} | {r.positions:,} | {r.text_s * 1e3:.2f} | {r.gather_bytes / 2**10:,.0f} | "
                     f"{r.gather_s * 1e3:.2f} | {(r.factor_bytes + r.allreduce_bytes) / 2**10:,.0f} | "
                     f"{r.reduce_s * 1e3:.2f} | {r.step_s * 1e3:.2f} | {r.speedup:.1f}x | {100 * r.efficiency:.0f}% |")
    return "\n".join(lines)


def gpu_rows(method, token_s: float, floor_s: float, exchange: dict, plans: dict, rings_only: bool = False):
    def link(world: int) -> Link:
        chosen = NVLINK if world <= 8 else INFINIBAND
        return replace(chosen, ranks_per_node=0) if rings_only else chosen
    return predict_scaling(method, WORLDS, token_s, link, kernel_floor_s=floor_s, fixed_s=1e-3,
                           global_batch=GLOBAL_BATCH, plans=plans, **exchange)


def bytes_by_kind(name: str, former, current) -> str:
    """One world size's bytes per kind, former vs current exchange."""
    kinds = [("class features + their gradients", former.gather_bytes, current.gather_bytes - current.image_bytes
              - current.stats_bytes),
             ("image features", former.image_bytes, current.image_bytes),
             ("softmax statistics", former.stats_bytes, current.stats_bytes),
             ("meta-network gradient factors", former.factor_bytes, current.factor_bytes),
             ("gradients all-reduced", former.allreduce_bytes, current.allreduce_bytes)]
    total_f = sum(k[1] for k in kinds)
    total_c = sum(k[2] for k in kinds)
    lines = [f"**{name}, {former.world_size} ranks: bytes per rank per step**", "",
             "| kind | former KiB | current KiB |", "|---|---:|---:|"]
    lines += [f"| {k} | {f / 2**10:,.1f} | {c / 2**10:,.1f} |" for k, f, c in kinds]
    lines.append(f"| **total** | **{total_f / 2**10:,.1f}** | **{total_c / 2**10:,.1f}** ({total_c / total_f:.3f}x) |")
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
    layers, width = len(text.blocks), text.width
    groups = {"General-10": general10(), "100 x 100 group": large_group()}
    methods = {name: build_method(backbone, group, MethodConfig(variant="NATA"), PromptConfig())
               for name, group in groups.items()}
    for name, method in methods.items():
        learnable = sum(q.numel() for q in method.learnable_parameters().values())
        print(f"# {args.arch} text tower ({layers} layers, width {width}), SoftCPT NATA, {name} "
              f"({method.num_classes} classes, {learnable:,} learnable elements), all classes every step, global "
              f"batch {GLOBAL_BATCH}; torch {torch.__version__}\n")
    plans = {name: {w: plan_all_classes(method, w) for w in WORLDS} for name, method in methods.items()}
    general = methods["General-10"]
    for label, exchange in (("former", FORMER), ("current", CURRENT)):
        cpu = predict_scaling(general, WORLDS[:4], measured, Link(10.0, 20.0, 0), feature_bytes=4,
                              global_batch=GLOBAL_BATCH, plans=plans["General-10"], **exchange)
        print(table(f"General-10, {label} exchange, measured here: {measured * 1e6:.0f} us per token position (fp32, "
                    f"{args.threads} CPU threads); links of 10 GB/s, 20 us", cpu) + "\n")
    # H200: 989 dense bf16 TFLOPS; 40% of it on the large packed GEMMs; a text pass takes >= 2 encoder calls
    # x layers x ~20 kernels (forward + backward) x 4 us of launch and sync however small its share.
    gpu_token = flop_token_cost(width, layers, 989.0, 0.4)
    floor = 2 * layers * 20 * 4e-6
    assumptions = (f"H200 (bf16): {gpu_token * 1e6:.2f} us per position (FLOPs at 40% of 989 TFLOPS), "
                   f"{floor * 1e3:.1f} ms kernel floor, 1 ms rest of step; NVLink {NVLINK.bandwidth_gb_s:.0f} GB/s "
                   f"{NVLINK.latency_us:.0f} us up to 8 ranks, InfiniBand {INFINIBAND.bandwidth_gb_s:.0f} GB/s "
                   f"{INFINIBAND.latency_us:.0f} us beyond, 8 GPUs a node")
    at64 = []
    for name, method in methods.items():
        rings = gpu_rows(method, gpu_token, floor, FORMER, plans[name], rings_only=True)
        former = gpu_rows(method, gpu_token, floor, FORMER, plans[name])
        current = gpu_rows(method, gpu_token, floor, CURRENT, plans[name])
        print(table(f"{name}, former exchange, rings only, assumed {assumptions}", rings) + "\n")
        print(table(f"{name}, former exchange, assumed {assumptions}", former) + "\n")
        print(table(f"{name}, current exchange, assumed {assumptions}", current) + "\n")
        at8 = WORLDS.index(8)
        print(bytes_by_kind(name, former[at8], current[at8]) + "\n")
        i = WORLDS.index(64)
        at64.append(f"| {name} | " + " | ".join(f"{r[i].step_s * 1e3:.2f} ms ({100 * r[i].efficiency:.1f}%)"
                                                for r in (rings, former, current))
                    + f" | {current[i].efficiency / rings[i].efficiency:.2f}x |")
    print("**64 ranks: step and efficiency**\n\n| group | former, rings only | former | current | current / rings only |\n"
          "|---|---:|---:|---:|---:|\n" + "\n".join(at64) + "\n")
    # A class-specific variant: its class contexts (a row per class) are read by one rank each and stay there.
    csta = build_method(backbone, groups["General-10"], MethodConfig(variant="CSTA"), PromptConfig())
    plan8 = {w: plan_all_classes(csta, w) for w in (1, 8)}
    former, current = (predict_scaling(csta, (1, 8), gpu_token, NVLINK, kernel_floor_s=floor, fixed_s=1e-3,
                                       global_batch=GLOBAL_BATCH, plans=plan8, **exchange)[1]
                       for exchange in (FORMER, CURRENT))
    learnable = sum(q.numel() for q in csta.learnable_parameters().values())
    print(bytes_by_kind(f"General-10, SoftCPT CSTA ({learnable:,} learnable elements)", former, current) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
