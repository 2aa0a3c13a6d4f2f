"""Every checkpoint write, read and resume check: prompt checkpoints and training checkpoints.

A **prompt checkpoint** (``<run>/prompt_checkpoint.pt``) holds the learnable tensors of every scope
plus what they were trained for (``meta``); it loads at any world size. A **training checkpoint**
holds everything needed to resume mid-epoch::

    <run>/checkpoints/<scope>/<tag>/   DeepSpeed's files (learnable module state, optimizer partitions),
                                        train_state.pt (epoch, step, sampler position, schedule, history,
                                        meta) and rng_rank<r>.pt per rank
    <run>/checkpoints/<scope>/latest   the newest complete tag, replaced atomically after every rank
                                        has finished writing; a save killed midway leaves it unchanged.

Loading refuses state made for another backbone, method, prompt setting or task list (and, for
training checkpoints, other engine, data or sampler settings) and names what differs. Every file
is read with ``torch.load(weights_only=True)``; writes are atomic.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch

from softcpt_dist import distributed as D
from softcpt_dist.config import MethodConfig, ModelConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.files import atomic_torch_save, atomic_write_text
from softcpt_dist.model.methods import method_label
from softcpt_dist.seeding import rng_state, set_rng_state

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
CHECKPOINT_NAME = "prompt_checkpoint.pt"
LATEST = "latest"
TRAIN_STATE = "train_state.pt"  # epoch, step, sampler position, schedule, history, meta (rank 0 writes)
STATE_KEYS = ("epoch", "step", "sampler", "skipped", "schedule_steps", "history", "epoch_totals", "epoch_seconds",
              "engine", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or made for a different setup."""


def checkpoint_meta(model: ModelConfig, method: MethodConfig, prompt: PromptConfig, group: TaskGroup) -> Dict:
    """What a checkpoint must agree on to be loaded: backbone, method, prompt settings, task list."""
    return {"format": FORMAT_VERSION, "arch": model.arch, "method": method_label(method),
            "prompt": {**asdict(prompt), "meta_net": method.meta_net, "meta_hidden": method.meta_hidden},
            "tasks": [{"key": t.key, "name": t.name, "classes": list(t.classnames)} for t in group.tasks]}


def save_prompt_checkpoint(path: Path, meta: Dict, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """``states`` maps a scope ("joint", or a task key for per-task runs) to a learnable state dict."""
    atomic_torch_save({"meta": meta, "states": states}, Path(path))


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


class TrainingCheckpoints:
    """Training checkpoints of one scope: save at step boundaries, check and restore on resume."""

    def __init__(self, folder: Path, keep: int, meta: Dict):
        self.folder, self.keep, self.meta = Path(folder), keep, meta

    def save(self, engine, tag: str, client_state: Dict) -> None:
        """All ranks write ``tag``; ``latest`` moves to it only when every rank has finished."""
        if D.rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        D.barrier()
        if D.broadcast_object(latest_tag(self.folder) if D.rank() == 0 else None) == tag:
            return  # this exact state is saved already (resumed there): never rewrite what `latest` names
        engine.save(self.folder, tag)
        torch.save(rng_state(), self.folder / tag / f"rng_rank{D.rank()}.pt")
        if D.rank() == 0:
            torch.save({**client_state, "meta": self.meta}, self.folder / tag / TRAIN_STATE)
        D.barrier()  # every rank has written: only now does `latest` move
        if D.rank() == 0:
            mark_latest(self.folder, tag, self.keep)
        D.barrier()

    def resume(self, engine, sampler, source: str) -> Optional[Dict]:
        """Check the saved state against this run (meta, engine and sampler settings incl. world size),
        then restore the engine, sampler, lr schedule and RNGs; returns the loop's saved state."""
        if source == "latest":  # rank 0 reads `latest` and tells the others: all load the same state
            folder, tag = self.folder, D.broadcast_object(latest_tag(self.folder) if D.rank() == 0 else None)
        else:
            folder, tag = _split_tag(Path(source))
        if tag is None:
            logger.info("train.resume=latest: no checkpoint in %s, starting fresh", self.folder)
            return None
        where = f"training checkpoint {folder / tag}"
        state = self._read_state(folder / tag, where)
        for key, value in engine.settings().items():
            if state["engine"].get(key) != value:
                raise CheckpointError(f"{where} was made with {key}={state['engine'].get(key)!r}, this run has "
                                      f"{key}={value!r}")
        sampler.load_state_dict(state["sampler"])  # refuses other data, sampler settings or world size
        if not engine.load(folder, tag):
            raise CheckpointError(f"DeepSpeed could not load the training checkpoint {folder / tag}")
        engine.schedule.load_state_dict({"steps": state["schedule_steps"]})
        rng_file = folder / tag / f"rng_rank{D.rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        if folder == self.folder and source != "latest":
            self._discard_newer_than(tag)
        logger.info("resumed from %s: epoch %d, step %d", where, state["epoch"] + 1, state["step"])
        return state

    def _read_state(self, path: Path, where: str) -> Dict:
        state_file = path / TRAIN_STATE
        if not state_file.is_file():
            raise CheckpointError(f"{where} has no {TRAIN_STATE}: not a complete training checkpoint")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        missing = sorted(set(STATE_KEYS) - set(state))
        if missing:
            raise CheckpointError(f"{where} lacks {missing}: it is incomplete or from an older version")
        check_meta(state["meta"], self.meta, where)
        return state

    def _discard_newer_than(self, tag: str) -> None:
        """Resumed from an older tag: the newer ones belong to the abandoned continuation."""
        D.barrier()
        if D.rank() == 0:
            for newer in (p for p in self.folder.iterdir() if p.is_dir() and p.name > tag):
                shutil.rmtree(newer, ignore_errors=True)
            mark_latest(self.folder, tag, self.keep)
        D.barrier()


def _split_tag(path: Path):
    if not path.is_dir():
        raise CheckpointError(f"train.resume: checkpoint folder not found: {path}")
    return path.parent, path.name
