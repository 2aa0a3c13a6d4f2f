"""A profile's numbers from every rank's timed steps: time split, throughput, FLOPs, MFU, memory, and the
class-parallel cost model calibrated on them; and the Markdown page that shows them."""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence

from softcpt_dist.config import Config
from softcpt_dist.model import method_label
from softcpt_dist.model.classifier import scores_shares
from softcpt_dist.profiling.flops import peak_tflops
from softcpt_dist.scaling import Link, predict_scaling
from softcpt_dist.training.engine import exchanges_by_structure

PHASES = ("image", "text_forward", "loss", "backward", "optimizer", "communication")  # timed
SPLIT = (*PHASES, "other")  # the split as reported: the timed phases and the rest of the step
COST_MODEL_WORLDS = (1, 2, 4, 8, 16, 32, 64)
LINKS = {"cuda": Link(300.0, 5.0, ranks_per_node=8),  # NVLink-class, 8 GPUs a node, NCCL's tree across nodes
         "cpu": Link(10.0, 20.0, ranks_per_node=0)}  # gloo over loopback (as measured here): rings


def default_link(device_type: str) -> Link:
    return LINKS.get(device_type, LINKS["cpu"])


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    at = (len(xs) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (at - low)


def spread_ms(seconds: Sequence[float]) -> Dict[str, float]:
    return {"median": 1e3 * statistics.median(seconds), "p10": 1e3 * percentile(seconds, 10),
            "p90": 1e3 * percentile(seconds, 90), "min": 1e3 * min(seconds), "max": 1e3 * max(seconds)}


def phase_seconds(steps: List[Dict]) -> Dict[str, List[float]]:
    """Per phase (and ``other``, the step's untimed rest, and ``step``) its seconds in each step."""
    out = {name: [s["phases"].get(name, 0.0) for s in steps] for name in PHASES}
    out["step"] = [s["phases"]["step"] for s in steps]
    out["other"] = [max(s["phases"]["step"] - sum(s["phases"].get(n, 0.0) for n in PHASES), 0.0) for s in steps]
    return out


BYTE_KINDS = {"image_bytes": "image features", "stats_bytes": "softmax statistics",
              "gathered_bytes": "class features", "reduced_bytes": "class-feature gradients",
              "factor_bytes": "gradient factors", "allreduce_bytes": "gradients all-reduced"}


def _mean(values) -> float:
    return sum(values) / len(values)


def summarize(cfg: Config, ranks: List[Dict], settings, env: Dict, method, cached: bool, micro: int) -> Dict:
    """The profile record (``profile.json``) from every rank's ``{"rank", "steps", "memory"}``."""
    world = len(ranks)
    main = phase_seconds(ranks[0]["steps"])
    step_s = statistics.median(main["step"])
    split = {name: spread_ms(main[name]) for name in SPLIT}
    flops_step = sum(_mean([s["flops_total"] for s in r["steps"]]) for r in ranks)
    by_part = {}
    for r in ranks:
        for s in r["steps"]:
            for part, passes in s["flops"].items():
                for key, value in passes.items():
                    by_part[f"{part}_{key}"] = by_part.get(f"{part}_{key}", 0) + value / len(r["steps"])
    positions = [statistics.median([s["positions"] for s in r["steps"]]) for r in ranks]
    peak, source = settings.peak_tflops, "--peak-tflops"
    if peak is None:
        peak, source = peak_tflops(env["device"], {"official_amp": "fp16", "official_fp16": "fp16"}.get(cfg.model.precision, cfg.model.precision)), "device table"
    achieved = flops_step / step_s / world / 1e12
    memory = [r["memory"] for r in ranks]
    return {
        "kind": "profile",
        "config": {"arch": cfg.model.arch, "precision": cfg.model.precision, "method": method_label(cfg.method),
                   "dataset": cfg.data.dataset, "tasks": len(method.class_task.unique()),
                   "classes": int(method.num_classes), "world_size": world, "micro_batch": micro,
                   "samples_per_step": micro * world, "grad_accum_steps": cfg.engine.grad_accum_steps,
                   "zero_stage": cfg.engine.zero_stage, "activation_checkpointing": cfg.engine.activation_checkpointing,
                   "text_path": cfg.text.path, "text_shard": cfg.text.shard, "kernels": cfg.kernels.enabled,
                   "cached_features": cached, "sampler": cfg.data.sampler.mode,
                   "tasks_per_batch": cfg.data.sampler.tasks_per_batch},
        "environment": env, "warmup": settings.warmup, "steps": settings.steps,
        "step_ms": spread_ms(main["step"]), "split_ms": split,
        "split_sum_ms": sum(split[name]["median"] for name in PHASES),
        "slowest_rank_step_ms": max(1e3 * statistics.median(phase_seconds(r["steps"])["step"]) for r in ranks),
        "samples_per_s": micro * world / step_s, "text_positions_per_step": positions,
        "text_positions_per_s": sum(positions) / step_s,
        "flops_per_step": flops_step, "flops_by_part": by_part, "achieved_tflops_per_rank": achieved,
        "peak_tflops": peak, "peak_source": source if peak is not None else None,
        "mfu": achieved / peak if peak else None,
        "memory": memory,
        "peak_memory_bytes": [m.get("peak_allocated_bytes", m.get("peak_rss_bytes")) for m in memory],
        "bytes_per_step": {k: statistics.median([s["bytes"][k] for s in ranks[0]["steps"]])
                           for k in ranks[0]["steps"][0].get("bytes", {})},
        "cost_model": cost_model(cfg, method, main, ranks[0]["steps"], settings.link or default_link(
            env["device_type"]), world),
    }


def cost_model(cfg: Config, method, main: Dict[str, List[float]], steps: List[Dict], link: Link,
               world: int) -> Optional[Dict]:
    """``softcpt_dist.scaling``'s step estimates, calibrated on this profile: seconds per token position from
    the text forward + backward, the rest of the step as fixed; None without class sharding."""
    if cfg.text.shard == "off" and world > 1:
        return None
    positions = statistics.median([s["positions"] for s in steps])
    text_s = statistics.median(main["text_forward"]) + statistics.median(main["backward"])
    fixed_s = max(statistics.median(main["step"]) - text_s - statistics.median(main["communication"]), 0.0)
    token_s = text_s / max(positions, 1)
    element = {"fp32": 4, "bf16": 2, "fp16": 2, "official_fp16": 2, "official_amp": 2}[cfg.model.precision]
    worlds = sorted(set(COST_MODEL_WORLDS) | {world})
    scoring = "shares" if scores_shares(cfg.text, method) else "gathered"
    structured = exchanges_by_structure(cfg.engine, method)
    estimates = predict_scaling(method, worlds, token_s, link, feature_bytes=element, fixed_s=fixed_s,
                                scoring=scoring, global_batch=cfg.optim.batch_size, structured=structured)
    return {"calibrated_at_world_size": world, "token_s": token_s, "fixed_s": fixed_s,
            "link": {"bandwidth_gb_s": link.bandwidth_gb_s, "latency_us": link.latency_us,
                     "ranks_per_node": link.ranks_per_node},
            "scoring": scoring, "gradient_exchange": "structured" if structured else "deepspeed",
            "predictions": [{"world_size": e.world_size, "step_s": e.step_s, "text_s": e.text_s,
                             "gather_s": e.gather_s, "reduce_s": e.reduce_s, "positions": e.positions,
                             "gather_bytes": e.gather_bytes, "factor_bytes": e.factor_bytes,
                             "allreduce_bytes": e.allreduce_bytes}
                            for e in estimates]}


def _flops(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= scale:
            return f"{value / scale:,.3g} {unit}"
    return f"{value:,.0f} FLOP"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def markdown(record: Dict) -> str:
    c, env = record["config"], record["environment"]
    v = env["versions"]
    step = record["step_ms"]
    lines = [f"# Profile: {c['method']} on {c['dataset']}, {c['arch']} ({c['precision']}), {c['world_size']} rank(s)",
             "", f"- device: {env['device']} ({env['device_type']}, {env['threads']} threads); "
             + ", ".join(f"{k} {v[k]}" for k in v if v[k]),
             f"- setup: micro-batch {c['micro_batch']} x {c['world_size']} rank(s), {c['tasks']} tasks / "
             f"{c['classes']} classes, {'cached image features' if c['cached_features'] else 'images'}, text path "
             f"{c['text_path']} (shard {c['text_shard']}), kernels {c['kernels']}, ZeRO stage {c['zero_stage']}"
             f"{', activation checkpointing' if c['activation_checkpointing'] else ''}",
             f"- {record['steps']} timed steps after {record['warmup']} warm-up; rank 0's split (phase boundaries "
             "synchronize the device; every collective counts as communication)", "",
             "| phase | median ms | p10 ms | p90 ms | share of step |", "|---|---:|---:|---:|---:|"]
    for name in SPLIT:
        s = record["split_ms"][name]
        lines.append(f"| {name} | {s['median']:.3f} | {s['p10']:.3f} | {s['p90']:.3f} | "
                     f"{100 * s['median'] / step['median']:.1f}% |")
    lines += [f"| **step** | **{step['median']:.3f}** | {step['p10']:.3f} | {step['p90']:.3f} | 100% |", "",
              f"- phases sum to {record['split_sum_ms']:.3f} ms of the {step['median']:.3f} ms median step; "
              f"slowest rank's median step {record['slowest_rank_step_ms']:.3f} ms",
              f"- throughput: {record['samples_per_s']:,.1f} samples/s, {record['text_positions_per_s']:,.0f} text "
              f"token positions/s (per step per rank: {', '.join(f'{p:,.0f}' for p in record['text_positions_per_step'])})",
              f"- model FLOPs per step (all ranks): {_flops(record['flops_per_step'])} ("
              + ", ".join(f"{k} {_flops(val)}" for k, val in record["flops_by_part"].items() if val) + ")",
              f"- achieved: {record['achieved_tflops_per_rank']:,.3f} TFLOP/s per rank; "
              + (f"peak {record['peak_tflops']:,.1f} TFLOP/s ({record['peak_source']}): MFU "
                 f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None
                 else "no peak known for this device (pass --peak-tflops for MFU)")]
    if any(record["bytes_per_step"].values()):
        lines.append("- received per step by rank 0: " + ", ".join(
            f"{BYTE_KINDS.get(k, k)} {v / 2**10:,.1f} KiB" for k, v in record["bytes_per_step"].items() if v))
    lines += ["", "| rank | frozen params MiB | learnable params MiB | text activations MiB | peak memory MiB |",
              "|---:|---:|---:|---:|---:|"]
    for rank, (mem, peak) in enumerate(zip(record["memory"], record["peak_memory_bytes"])):
        lines.append(f"| {rank} | {_mib(mem['frozen_param_bytes'])} | {_mib(mem['learnable_param_bytes'])} | "
                     f"{_mib(mem.get('text_activation_bytes'))} | {_mib(peak)} |")
    return "\n".join(lines) + "\n"
