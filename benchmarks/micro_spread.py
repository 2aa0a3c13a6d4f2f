"""The micro world's claims over pre-training seeds and thread counts (docs/results.md#the-micro-world).

For every pre-training seed and thread count, pre-trains the default micro CLIP (``model.micro.seed``,
``OMP_NUM_THREADS``), then runs the default job (SoftCPT NATA, 4 shots, seeds 1-3, zero-shot beside it) on
the default group for each SoftCPT lr, on the given split; prints one JSON line per (CLIP, lr) and a
markdown table. Everything lives under ``--out`` (CLIPs, group, runs), so nothing of ``data/`` is touched.

    python benchmarks/micro_spread.py --out /tmp/spread --split val --lrs 0.002,0.03   # choose the lr
    python benchmarks/micro_spread.py --out /tmp/spread --split test --lrs 0.002      # the claims
    python benchmarks/micro_spread.py --out /tmp/spread --split val --set prompt.n_ctx=4  # another setting
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_clip(out: Path, seed: int, split: str, lrs: list, overrides: list) -> list:
    """Runs in a process of its own (the thread count is fixed at torch's import); ``overrides`` (key=value)
    go to every run and name it."""
    from softcpt_dist.cli import main

    clip = out / f"clip-seed{seed}-threads{os.environ['OMP_NUM_THREADS']}"
    common = [f"model.micro.seed={seed}", f"model.micro.dir={clip}", f"data.root={out / 'group'}",
              f"data.cache.dir={clip / 'features'}", f"train.output_dir={clip / 'runs'}", "train.progress=false",
              f"train.eval_split={split}"]
    rows = []
    for lr in lrs:
        runs = []
        for run_seed in (1, 2, 3):
            name = "-".join([split, *(o.replace("=", "") for o in overrides), f"lr{lr}", f"seed{run_seed}"])
            if not (clip / "runs" / name / "results.json").is_file():
                assert main(["train", "--config", str(REPO / "configs/default.yaml"), *common, f"train.run_name={name}",
                             f"optim.lr={lr}", f"train.seed={run_seed}", *overrides]) == 0
            runs.append(json.loads((clip / "runs" / name / "results.json").read_text()))
        zero_shot = runs[0]["zero_shot"]
        rows.append({"seed": seed, "threads": int(os.environ["OMP_NUM_THREADS"]), "split": split, "lr": lr,
                     "overrides": overrides,
                     "zero_shot": {k: v["value"] for k, v in zero_shot["tasks"].items()},
                     "zero_shot_mean": zero_shot["mean"],
                     "softcpt": [{k: v["value"] for k, v in r["tasks"].items()} for r in runs],
                     "softcpt_means": [r["mean"] for r in runs]})
    return rows


def table(rows: list) -> str:
    from softcpt_dist.micro.group import TASKS

    chance = {task.key: 100 / task.num_classes for task in TASKS}
    tasks = list(chance)
    lines = ["| pre-training | lr | zero-shot " + " / ".join(tasks) + " | zero-shot mean | SoftCPT seeds 1/2/3 "
             "| SoftCPT − zero-shot, mean | SoftCPT − zero-shot per task | zero-shot − chance, lowest task |",
             "|---|---:|---|---:|---|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["lr"], r["threads"], r["seed"])):
        gains = [sum(s[t] for s in r["softcpt"]) / 3 - r["zero_shot"][t] for t in tasks]
        gain = sum(r["softcpt_means"]) / 3 - r["zero_shot_mean"]
        margin = min(r["zero_shot"][t] - chance[t] for t in tasks)
        lines.append(f"| seed {r['seed']}, {r['threads']} thread(s) | {r['lr']} | "
                     + " / ".join(f"{r['zero_shot'][t]:.1f}" for t in tasks)
                     + f" | {r['zero_shot_mean']:.2f} | " + " / ".join(f"{m:.2f}" for m in r["softcpt_means"])
                     + f" | {gain:+.2f} | " + " / ".join(f"{g:+.1f}" for g in gains) + f" | {margin:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2", help="pre-training seeds")
    ap.add_argument("--threads", default="1,2", help="thread counts")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--lrs", default="0.002", help="SoftCPT learning rates")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one pre-training seed, this process
    args = ap.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    if args.one is not None:
        print(json.dumps(one_clip(args.out, args.one, args.split, lrs, args.set)))
        return
    rows = []
    for threads in args.threads.split(","):
        for seed in args.seeds.split(","):
            done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--split", args.split,
                                   "--lrs", args.lrs, "--one", seed, "--set", *args.set], env={**os.environ, "OMP_NUM_THREADS": threads},
                                  capture_output=True, text=True, check=True)
            for row in json.loads(done.stdout.strip().splitlines()[-1]):
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
