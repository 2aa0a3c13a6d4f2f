"""Prompt checkpoints: the learnable tensors plus what they were trained for.

Loading refuses a checkpoint made for another backbone, method or task list and says which
differs. Writes are atomic (temp file, then rename), so an interrupted save never replaces a
good checkpoint with a broken one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import torch

from softcpt_dist.run_dir import atomic_write_text

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or made for a different setup."""


def checkpoint_meta(arch: str, method: str, group, prompt: Dict) -> Dict:
    """What a checkpoint must agree on to be loaded: backbone, method, prompt settings, task list."""
    return {"format": FORMAT_VERSION, "arch": arch, "method": method, "prompt": prompt,
            "tasks": [{"key": t.key, "name": t.name, "classes": list(t.classnames)} for t in group.tasks]}


def save_prompt_checkpoint(path: Path, meta: Dict, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """``states`` maps a scope ("joint", or a task key for per-task runs) to a learnable state dict."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"meta": meta, "states": states}, tmp)
    os.replace(tmp, path)


def load_prompt_checkpoint(path: Path, expected_meta: Dict) -> Dict[str, Dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta, states = payload["meta"], payload["states"]
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if meta.get("format") != expected_meta["format"]:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {expected_meta['format']}")
    check_meta(meta, expected_meta, f"checkpoint {path}")
    return states


def load_learnable(module: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """Copy a learnable state into ``module``; names and shapes must match exactly."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise CheckpointError(f"{where}: learnable tensors differ: missing {sorted(set(params) - set(state))}, "
                              f"unexpected {sorted(set(state) - set(params))}")
    for name, p in params.items():
        if p.shape != state[name].shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(state[name].shape)}, "
                                  f"expected {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


# --- training checkpoints (resume after preemption) ----------------------------------------------
#
# <run>/checkpoints/<scope>/<tag>/   DeepSpeed's files (learnable module state, optimizer partitions),
#                                     train_state.pt (epoch, step, sampler position, schedule, history,
#                                     meta) and rng_rank<r>.pt per rank
# <run>/checkpoints/<scope>/latest   the newest complete tag, replaced atomically after every rank
#                                     has finished writing; a save killed midway leaves it unchanged.

LATEST = "latest"


def latest_tag(folder: Path):
    """The newest complete checkpoint tag in ``folder``, or None."""
    marker = Path(folder) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not (Path(folder) / tag).is_dir():
        raise CheckpointError(f"{marker} names checkpoint {tag!r}, which does not exist in {folder}")
    return tag


def mark_latest(folder: Path, tag: str, keep: int) -> None:
    """Point ``latest`` at ``tag`` (atomically), then delete all but the newest ``keep`` tags (main rank)."""
    import shutil
    folder = Path(folder)
    atomic_write_text(folder / LATEST, tag + "\n")
    tags = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep] if keep > 0 else []:
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def check_meta(saved: Dict, expected: Dict, where: str) -> None:
    """Refuse state made for another backbone, method, prompt setting or task list, naming the difference."""
    for key in ("arch", "method"):
        if saved.get(key) != expected[key]:
            raise CheckpointError(f"{where} was made for {key}={saved.get(key)!r}, this run has {key}={expected[key]!r}")
    got_prompt, want_prompt = saved.get("prompt") or {}, expected["prompt"]
    for key in sorted(set(got_prompt) | set(want_prompt)):
        if got_prompt.get(key) != want_prompt.get(key):
            raise CheckpointError(f"{where} was made with prompt setting {key}={got_prompt.get(key)!r}, "
                                  f"this run has {key}={want_prompt.get(key)!r}")
    got, want = saved.get("tasks", []), expected["tasks"]
    if [t["key"] for t in got] != [t["key"] for t in want]:
        raise CheckpointError(f"{where} was made for tasks {[t['key'] for t in got]}, "
                              f"this run has {[t['key'] for t in want]}")
    for g, w in zip(got, want):
        if g != w:
            field = next(k for k in ("name", "classes") if g.get(k) != w.get(k))
            raise CheckpointError(f"{where}: task {w['key']!r} differs in its {field}: "
                                  f"{g.get(field)!r} vs {w.get(field)!r}")
