"""Training throughput (samples/s) on 1 and 2 ranks, side by side in one run.

Launches the same training job with torchrun at each world size (same global batch, so the same
optimization), reads the per-epoch ``samples_per_s`` from each run's ``metrics.jsonl`` (first epoch
skipped as warm-up), and prints the median per world size and the ratio to one rank.

    python benchmarks/rank_scaling.py                                   # tiny CLIP, CPU, gloo, ~1 min
    python benchmarks/rank_scaling.py --ranks 1 2 4 8 --zero-stage 3 -- model.arch=ViT-L-14 model.device=cuda \\
        model.precision=bf16 data.dataset=general10 data.root=/datasets      # on a GPU node
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


def run(nproc: int, work: Path, zero: int, epochs: int, batch: int, extra) -> dict:
    name = f"ranks{nproc}-zero{zero}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "softcpt_dist.cli", "train", f"data.root={work / 'data'}", "data.shots=0",
           "data.train_augment=none", f"optim.epochs={epochs}", f"optim.batch_size={batch}",
           f"engine.zero_stage={zero}", f"train.output_dir={work / 'runs'}", f"train.run_name={name}",
           "train.progress=false", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r["kind"] == "epoch"][1:]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "wall": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("extra", nargs="*", help="config overrides passed to every run")
    args = p.parse_args(argv)
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {n: run(n, work, args.zero_stage, args.epochs, args.batch_size, args.extra) for n in args.ranks}
    base = results[args.ranks[0]]["median"]
    print(f"# rank scaling: ZeRO {args.zero_stage}, global batch {args.batch_size}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores, overrides {args.extra or 'none'}; median of epochs 2..{args.epochs}")
    print(f"{'ranks':>5} {'samples/s':>10} {'min':>9} {'max':>9} {'vs ' + str(args.ranks[0]):>7} {'job wall s':>11}")
    for n, r in results.items():
        print(f"{n:>5} {r['median']:>10.1f} {r['min']:>9.1f} {r['max']:>9.1f} {r['median'] / base:>6.2f}x "
              f"{r['wall']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
