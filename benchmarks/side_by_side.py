"""Running a benchmark's paths side by side, each in a fresh process of the same script, and comparing their
outputs: what ``text_encoding.py`` and ``cocoop_text.py`` share."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch


def add_arguments(parser: argparse.ArgumentParser, paths: Sequence[str], groups: Sequence[str],
                  dtypes: Sequence[str]) -> None:
    """The options every side-by-side benchmark takes (and the hidden ones of its workers)."""
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--group", default="plant6", choices=sorted(groups))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=sorted(dtypes))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+", default=list(paths), choices=paths)
    parser.add_argument("--worker", choices=paths, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


def worker_arguments(args: argparse.Namespace, *extra: str) -> List[str]:
    """The options a worker gets from the main process's ``args`` (those of ``add_arguments``, then ``extra``)."""
    return ["--arch", args.arch, "--group", args.group, "--device", args.device, "--precision", args.precision,
            "--repeats", str(args.repeats), *extra]


def run_paths(script: str, paths: Sequence[str], worker_args: List[str]) -> Tuple[Dict[str, dict], Dict[str, dict]]:
    """``script --worker PATH --out FILE *worker_args`` for each path in turn: the JSON summary each worker prints
    last and the tensors it saved to FILE. A failed path is reported and left out."""
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            out = Path(tmp) / f"{path}.pt"
            cmd = [sys.executable, script, "--worker", path, "--out", str(out), *worker_args]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode:
                why = "killed (out of memory)" if proc.returncode in (-9, 137) else proc.stderr.strip()[-500:]
                print(f"{path}: failed: {why}", flush=True)
                continue
            results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[path] = torch.load(out, weights_only=True)
    return results, outputs


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|ours − reference| / max|reference|``."""
    return float((ours - reference).abs().max() / reference.abs().max())


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
