"""A large task group on 1, 2 and 4 CPU ranks: per-rank text memory and bytes exchanged per step, measured.

Writes a generated group of 100 tasks x 100 classes (``group_shapes.large_group``: class names of one to
three words from CLIP's vocabulary; one noise image per class and split) and profiles SoftCPT NATA on it
(``softcpt-dist profile``, all 10,000 classes every step, cached image features, global batch 32) at each
world size, with the current exchange (class-parallel scoring, the meta network's gradient by factors)
and, above one rank, the former one (class features gathered, every gradient all-reduced). The text
tower is the small ``softcpt-tiny`` (2 layers, width 128; a ViT-L step over 10,000 classes does not fit
a CPU), so the figures show how memory and bytes divide over ranks, not ViT-L's sizes: those are the
cost model's (``scaling_model.py``).

    python benchmarks/large_group.py                   # about 16 min on 2 CPU cores (data and cache included)
    python benchmarks/large_group.py --ranks 1 2 4 8 -- model.arch=ViT-B-16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KINDS = {"image_bytes": "image features", "stats_bytes": "softmax stats", "gathered_bytes": "class features",
         "reduced_bytes": "class-feature grads", "factor_bytes": "factor table", "allreduce_bytes": "grads all-reduced"}
FORMER = ["text.scoring=gathered", "engine.gradient_exchange=deepspeed"]


def profile(nproc: int, work: Path, name: str, data: Path, args) -> dict:
    out = work / "profiles" / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "softcpt_dist.cli", "profile", "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--out", str(out), "data.dataset=task_folders", f"data.root={data}", "data.shots=0",
           "data.train_augment=none", "data.cache.enabled=true", f"data.cache.dir={work / 'cache'}",
           "model.arch=softcpt-tiny", "optim.batch_size=32", f"train.output_dir={work / 'runs'}",
           *(FORMER if name.endswith("former") else []), *args.extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads((out / "profile.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="a folder to work in (kept: data and cache are reused)")
    p.add_argument("extra", nargs="*", help="config overrides passed to every run")
    args = p.parse_args(argv)
    from group_shapes import large_group, write_folders

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        data = work / "large100"
        if not (data / "tasks.json").is_file():
            write_folders(large_group(), data, per_class=1)
        runs = [(n, "current") for n in args.ranks] + [(n, "former") for n in args.ranks if n > 1]
        records = {run: profile(run[0], work, f"ranks{run[0]}-{run[1]}", data, args) for run in runs}
    print(f"# 100 tasks x 100 classes, SoftCPT NATA, softcpt-tiny text tower, cached features, global batch 32, "
          f"1 thread per rank; median of {args.steps} steps after {args.warmup} warm-up; overrides "
          f"{args.extra or 'none'}\n")
    print("| ranks | exchange | step ms | token positions per rank | text activations MiB per rank | "
          "peak RSS MiB per rank | " + " | ".join(f"{k} KiB" for k in KINDS.values()) + " | total KiB |")
    print("|---:|---|---:|---|---|---|" + "---:|" * (len(KINDS) + 1))
    for (n, exchange), r in records.items():
        sent = r["bytes_per_step"]
        print(f"| {n} | {exchange} | {r['step_ms']['median']:,.0f} | "
              + "/".join(f"{x:,.0f}" for x in r["text_positions_per_step"]) + " | "
              + "/".join(f"{m.get('text_activation_bytes', 0) / 2**20:,.1f}" for m in r["memory"]) + " | "
              + "/".join(f"{b / 2**20:,.0f}" for b in r["peak_memory_bytes"]) + " | "
              + " | ".join(f"{sent.get(k, 0) / 2**10:,.1f}" for k in KINDS) + f" | {sum(sent.values()) / 2**10:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
