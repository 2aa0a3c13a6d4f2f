"""Training steps/s on 1 and 2 (or more) ranks, side by side in one run, with every rank's memory.

Launches the same ``softcpt-dist train`` job with torchrun at each world size (same global batch, so
the same optimization), one thread per rank (so 1 and 2 ranks use 1 and 2 cores), and reads from
each run folder: the per-epoch ``samples_per_s`` (first epoch skipped as warm-up; median), the text
work per rank (token positions encoded, all-gather bytes, autograd-saved text activations) and each
rank's peak memory (``memory_joint.json``: peak RSS on CPU, max allocated on CUDA).

``--text-bound`` (the default) is the step class-parallel text encoding is for: a task group shaped
like Plant-6 (6 tasks, 116 classes, their real class names; 2 training images per class), cached
image features, the ViT-B-16 CLIP at random init. ``--shard-off`` adds runs with ``text.shard=off``
(every rank encodes every class: the behaviour before class sharding) at each world size above 1;
``--former`` adds runs with the exchange before class-parallel scoring (``text.scoring=gathered``,
``engine.gradient_exchange=deepspeed``). "exchanged KiB" counts every kind of bytes a rank received per
step (class features and their gradients, image features, softmax statistics, gradients), also printed by
kind. A per-task method (CoOp CA, KgCoOp, ProGrad, PLOT: one scope per task) is measured over every scope's
epochs but its first.

    python benchmarks/rank_scaling.py                                   # Plant-6 shape, ViT-B-16, CPU
    python benchmarks/rank_scaling.py --former                          # former vs current exchange
    python benchmarks/rank_scaling.py --repeats 3 --epochs 6            # interleaved runs, medians (noisy hosts)
    python benchmarks/rank_scaling.py --shard-off --zero-stage 3
    python benchmarks/rank_scaling.py --no-text-bound --epochs 6        # the built-in demo data, tiny CLIP
    python benchmarks/rank_scaling.py --former -- method.name=prograd   # a per-task baseline
    python benchmarks/rank_scaling.py --ranks 1 2 4 8 -- model.arch=ViT-L-14 model.device=cuda \\
        model.precision=bf16                                            # on a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def plant6_folders(root: Path, per_class: int = 2, size: int = 32) -> Path:
    """A ``task_folders`` dataset with Plant-6's tasks and class names (plain noise images)."""
    from group_shapes import plant6, write_folders
    return write_folders(plant6(), root, per_class, size)


# Bytes received per step by kind: the epoch records' key and how the printout names it.
BYTE_KINDS = {"text_gather_bytes_per_step": "class features", "text_grad_reduce_bytes_per_step": "their gradients",
              "image_gather_bytes_per_step": "image features", "softmax_stats_bytes_per_step": "softmax statistics",
              "grad_factor_bytes_per_step": "gradient factors", "grad_allreduce_bytes_per_step": "gradients all-reduced"}
FORMER = ["text.scoring=gathered", "engine.gradient_exchange=deepspeed"]  # the exchange before class-parallel scoring


def run(nproc: int, work: Path, name: str, args, extra) -> dict:
    import shutil
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    # Each rank pinned to a core of its own (taskset -c <local rank>): no migrations, no rank sharing a core.
    pinned = f'exec taskset -c "$LOCAL_RANK" {sys.executable} -m softcpt_dist.cli "$@"'
    launch = ["--no-python", "bash", "-c", pinned, "-"] if args.pin else ["-m", "softcpt_dist.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launch, "train", "data.shots=0", "data.train_augment=none",
           f"optim.epochs={args.epochs}", f"optim.batch_size={args.batch_size}", f"engine.zero_stage={args.zero_stage}",
           f"train.output_dir={work / 'runs'}", f"train.run_name={name}", "train.progress=false", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    folder = work / "runs" / name
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    # every scope's epochs but its first (warm-up); a per-task method trains one scope per task
    scopes: dict = {}
    for r in records:
        if r["kind"] == "epoch":
            scopes.setdefault(r.get("scope", "joint"), []).append(r)
    epochs = [r for scope in scopes.values() for r in scope[1:]]
    ranks = [json.loads(f.read_text())["ranks"] for f in sorted(folder.glob("memory_*.json"))]
    rates = [r["samples_per_s"] for r in epochs]
    last = epochs[-1]
    return {"steps_per_s": statistics.median(rates) / args.batch_size, "min": min(rates) / args.batch_size,
            "max": max(rates) / args.batch_size, "wall": wall, "positions": last["text_positions_per_step"],
            "exchanged_kib": statistics.mean(sum(r.get(k, 0) for k in BYTE_KINDS) for r in epochs) / 2**10,
            "kib_by_kind": {k: statistics.mean(r.get(k, 0) for r in epochs) / 2**10 for k in BYTE_KINDS},
            "activation_mib": [b / 2**20 for b in last["text_activation_bytes"]],
            "peak_mib": [max(m.get("peak_allocated_bytes", m.get("peak_rss_bytes", 0)) for m in by_scope) / 2**20
                         for by_scope in zip(*ranks)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--text-bound", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--shard-off", action="store_true", help="also run text.shard=off above 1 rank")
    p.add_argument("--former", action="store_true", help="also run the former exchange above 1 rank (class "
                   "features gathered, every gradient all-reduced by DeepSpeed)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin rank i to CPU core i (CPU runs; --no-pin on GPU nodes)")
    p.add_argument("--repeats", type=int, default=1, help="run every configuration this many times, interleaved "
                   "(1, 2, 1, 2, ...), and report the median: drift and noisy neighbours hit all configurations alike")
    p.add_argument("--work", type=Path, default=None, help="a folder to work in (kept: its feature cache is reused)")
    p.add_argument("extra", nargs="*", help="config overrides passed to every run")
    args = p.parse_args(argv)
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.text_bound:
            data = work / "plant6" if (work / "plant6" / "tasks.json").is_file() else plant6_folders(work / "plant6")
            base = ["data.dataset=task_folders", f"data.root={data}", "model.arch=ViT-B-16", "data.cache.enabled=true",
                    f"data.cache.dir={work / 'cache'}"]
        else:
            base = [f"data.root={work / 'data'}"]
        runs = [(n, "auto") for n in args.ranks] + [(n, "off") for n in args.ranks if args.shard_off and n > 1] \
            + [(n, "former") for n in args.ranks if args.former and n > 1]
        repeats = {}
        for _ in range(args.repeats):
            for n, shard in runs:  # "former": text.shard=auto with the former exchange
                extra = FORMER if shard == "former" else [f"text.shard={shard}"]
                repeats.setdefault((n, shard), []).append(run(n, work, f"ranks{n}-{shard}", args,
                                                              [*base, *extra, *args.extra]))
        results = {key: {**rs[-1], "steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
                         "each": [r["steps_per_s"] for r in rs]} for key, rs in repeats.items()}
    what = "text-bound Plant-6 shape, ViT-B-16 random init, cached image features" if args.text_bound else "demo"
    pinned = ", pinned" if args.pin else ""
    print(f"# rank scaling ({what}): ZeRO {args.zero_stage}, global batch {args.batch_size}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPU cores, 1 thread per rank{pinned}, overrides {args.extra or 'none'}; "
          f"median of epochs 2..{args.epochs}" + (f", median of {args.repeats} interleaved runs" if args.repeats > 1 else ""))
    base_rate = results[(args.ranks[0], "auto")]["steps_per_s"]
    print(f"{'ranks':>5} {'text.shard':>10} {'steps/s':>8} {'vs ' + str(args.ranks[0]):>6} {'positions/rank':>15} "
          f"{'exchanged KiB':>13} {'activations MiB/rank':>21} {'peak MiB/rank':>15} {'wall s':>7}")
    for (n, shard), r in results.items():
        print(f"{n:>5} {shard:>10} {r['steps_per_s']:>8.3f} {r['steps_per_s'] / base_rate:>5.2f}x "
              f"{'/'.join(f'{x:.0f}' for x in r['positions']):>15} {r['exchanged_kib']:>13.1f} "
              f"{'/'.join(f'{x:.1f}' for x in r['activation_mib']):>21} "
              f"{'/'.join(f'{x:.0f}' for x in r['peak_mib']):>15} {r['wall']:>7.1f}")
    for (n, shard), r in results.items():  # what a rank received per step, by kind (mean over the epochs above)
        if n > 1:
            kinds = ", ".join(f"{name} {r['kib_by_kind'][k]:.1f}" for k, name in BYTE_KINDS.items())
            print(f"# {n} ranks, {shard}: KiB per step: {kinds}")
    if args.repeats > 1:  # each repeat's ratio to the first world size's run of the same repeat
        first = repeats[(args.ranks[0], "auto")]
        for key, rs in repeats.items():
            each = ", ".join(f"{x:.3f}" for x in results[key]["each"])
            ratios = ", ".join(f"{r['steps_per_s'] / f['steps_per_s']:.2f}x" for r, f in zip(rs, first))
            print(f"# {key[0]} ranks, {key[1]}: steps/s per run {each}; vs {args.ranks[0]} rank(s) in the same "
                  f"repeat {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
