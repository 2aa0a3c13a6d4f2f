"""``softcpt-dist scaling``: profiles at several world sizes (and model sizes, class counts), one CSV, plots.

``run`` launches ``softcpt-dist profile`` once per point -- world size x ``--vary`` combination x mode --
into ``<out>/<point>/`` (torchrun on this machine, or srun inside a SLURM allocation), keeps points
that already have a ``profile.json`` (a study resumes), then collects. Strong scaling keeps the global
batch (``optim.batch_size``) at every world size; weak scaling keeps the batch per rank (the global
batch grows with the ranks). ``collect`` reads any profile folders into ``scaling.csv`` and the PNGs
(``plots.py``); a series is the points that differ only in world size.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from softcpt_dist.config import ConfigError, load_config
from softcpt_dist.files import atomic_write_text
from softcpt_dist.profiling.summary import SPLIT

logger = logging.getLogger(__name__)
POINT_RECORD = "scaling_point.json"  # what `run` asked of a point: its mode and varied keys
SERIES_KEYS = ("arch", "precision", "method", "dataset", "tasks", "classes", "zero_stage", "text_path", "text_shard",
               "kernels", "cached_features", "activation_checkpointing", "device")


def main(args) -> int:
    if args.scaling_command == "collect":
        rows = write_study(collect(args.profiles), args.out)
        print(f"{len(rows)} profile(s): {args.out / 'scaling.csv'} and plots in {args.out}")
        return 0
    return run_study(args)


def _vary(specs: List[str]) -> List[Dict[str, str]]:
    """``["model.arch=A,B", "data.tasks=..."]`` -> every combination, as override dicts."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"scaling --vary {spec!r}: expected KEY=V1,V2,...")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _point_name(mode: str, varied: Dict[str, str], world: int) -> str:
    label = "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in varied.items())
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
    return f"{mode}{'-' + safe if safe else ''}-w{world}"


def _launch_command(world: int, launcher: str, per_node: int) -> Tuple[List[str], Dict[str, str]]:
    env = {}
    if launcher == "srun":
        nodes = math.ceil(world / per_node)
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], check=True,
                               capture_output=True, text=True).stdout.split()
        env.update(MASTER_ADDR=hosts[0], MASTER_PORT=str(20000 + (int(os.environ["SLURM_JOB_ID"]) + world) % 20000))
        return ["srun", f"--ntasks={world}", f"--nodes={nodes}", f"--ntasks-per-node={min(world, per_node)}",
                "--kill-on-bad-exit=1", sys.executable, "-m", "softcpt_dist.cli"], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "softcpt_dist.cli"], env


def run_study(args) -> int:
    launcher = args.launcher
    if launcher == "auto":
        launcher = "srun" if os.environ.get("SLURM_JOB_ID") else "torchrun"
    if launcher == "srun" and not os.environ.get("SLURM_JOB_ID"):
        raise ConfigError("scaling run --launcher srun: not inside a SLURM allocation (no SLURM_JOB_ID)")
    per_node = args.gpus_per_node or int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    modes = ("strong", "weak") if args.mode == "both" else (args.mode,)
    try:
        ranks = sorted({int(w) for w in args.ranks})
    except ValueError:
        raise ConfigError(f"scaling run --ranks: world sizes are integers (got {args.ranks})") from None
    if not ranks or ranks[0] < 1:
        raise ConfigError(f"scaling run --ranks: world sizes must be >= 1 (got {args.ranks})")
    points = []
    for varied in _vary(args.vary):
        overrides = list(args.overrides) + [f"{k}={v}" for k, v in varied.items()]
        cfg = load_config(args.config, overrides)  # a bad config or key fails here, before anything runs
        base = cfg.optim.batch_size
        for mode in modes:
            for world in ranks:
                batch = base if mode == "strong" else base * world
                if batch % (world * cfg.engine.grad_accum_steps):
                    raise ConfigError(f"scaling run ({mode}): optim.batch_size={batch} does not split over {world} "
                                      f"rank(s) x engine.grad_accum_steps={cfg.engine.grad_accum_steps}")
                points.append((mode, varied, world, overrides + [f"optim.batch_size={batch}"], cfg.model.device))
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for mode, varied, world, overrides, device in points:
        folder = args.out / _point_name(mode, varied, world)
        if (folder / "profile.json").is_file():
            logger.info("scaling: %s has its profile already: kept", folder.name)
            continue
        command, env = _launch_command(world, launcher, per_node)
        command += ["profile", "--config", *map(str, args.config), *overrides, "--warmup", str(args.warmup),
                    "--steps", str(args.steps), "--out", str(folder)]
        if args.peak_tflops is not None:
            command += ["--peak-tflops", str(args.peak_tflops)]
        env = {**os.environ, **env}
        if device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")  # one core per rank: 2 ranks use 2 cores
        logger.info("scaling: %s (%s, %d rank(s)): %s", folder.name, mode, world, " ".join(command))
        if subprocess.run(command, env=env).returncode != 0 or not (folder / "profile.json").is_file():
            failed.append(folder.name)
            continue
        atomic_write_text(folder / POINT_RECORD, json.dumps({"mode": mode, "varied": varied, "world_size": world}))
    rows = write_study(collect([args.out]), args.out)
    print(f"{len(rows)} profile(s): {args.out / 'scaling.csv'} and plots in {args.out}")
    if failed:
        logger.error("scaling: %d point(s) failed: %s (their logs are in their folders)", len(failed), ", ".join(failed))
        return 1
    return 0


def _profiles(paths: List[Path]) -> List[Path]:
    found = []
    for path in paths:
        if not path.exists():
            raise ConfigError(f"scaling collect: {path} does not exist")
        found += [path / "profile.json"] if (path / "profile.json").is_file() else sorted(path.rglob("profile.json"))
    if not found:
        raise ConfigError(f"scaling collect: no profile.json under {', '.join(map(str, paths))}")
    return found


def _row(path: Path) -> Dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"scaling collect: cannot read {path}: {err}") from None
    if record.get("kind") != "profile":
        raise ConfigError(f"scaling collect: {path} is not a profile record")
    c = record["config"]
    point = path.parent / POINT_RECORD
    row = {k: c.get(k) for k in SERIES_KEYS if k != "device"}
    row.update(device=record["environment"]["device"], world_size=c["world_size"], micro_batch=c["micro_batch"],
               samples_per_step=c["samples_per_step"], mode=json.loads(point.read_text())["mode"] if point.is_file()
               else None, step_ms=record["step_ms"]["median"], step_ms_p10=record["step_ms"]["p10"],
               step_ms_p90=record["step_ms"]["p90"], samples_per_s=record["samples_per_s"],
               text_positions_per_s=record["text_positions_per_s"],
               tflops_per_rank=record["achieved_tflops_per_rank"], mfu=record["mfu"],
               peak_memory_mib=max(b or 0 for b in record["peak_memory_bytes"]) / 2**20, folder=str(path.parent))
    row.update({f"{p}_ms": record["split_ms"][p]["median"] for p in SPLIT})
    row["_cost_model"] = record.get("cost_model")
    return row


def collect(paths: List[Path]) -> List[Dict]:
    """One row per profile; per series, speed-up and efficiency against its smallest world size, the ideal
    throughput and the cost model's prediction (from the smallest world's calibration)."""
    rows = [_row(p) for p in _profiles(paths)]
    series: Dict[Tuple, List[Dict]] = {}
    for row in rows:
        series.setdefault(tuple(row[k] for k in SERIES_KEYS) + (row["mode"],), []).append(row)
    for members in series.values():
        members.sort(key=lambda r: r["world_size"])
        if any(r["mode"] is None for r in members):  # profiles not run by `scaling run`: infer the mode
            mode = "strong" if len({r["samples_per_step"] for r in members}) == 1 else (
                "weak" if len({r["micro_batch"] for r in members}) == 1 else "mixed")
            for r in members:
                r["mode"] = r["mode"] or mode
        base = members[0]
        model = base["_cost_model"]
        predicted = {p["world_size"]: p["step_s"] for p in model["predictions"]} if model else {}
        for r in members:
            factor = r["world_size"] / base["world_size"]
            r["ideal_samples_per_s"] = base["samples_per_s"] * factor
            r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
            r["efficiency"] = r["speedup"] / factor
            r["predicted_samples_per_s"] = (r["samples_per_step"] / predicted[r["world_size"]]
                                            if r["world_size"] in predicted and predicted[r["world_size"]] > 0
                                            else None)
            r["series"] = f"{r['arch']} {r['precision']}, {r['classes']} classes ({r['mode']})"
    return sorted(rows, key=lambda r: (r["series"], r["world_size"]))


def write_study(rows: List[Dict], out: Path) -> List[Dict]:
    """``scaling.csv`` and the plots into ``out``."""
    from softcpt_dist.profiling import plots
    out.mkdir(parents=True, exist_ok=True)
    columns = [k for k in rows[0] if not k.startswith("_")]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "scaling.csv", text.getvalue())
    plots.draw(rows, out)
    return rows
