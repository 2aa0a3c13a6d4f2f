"""What every checkpoint shares: errors, the weights-only reader, the meta a checkpoint must agree on,
the settings a resume is checked against, and the ``latest`` marker of training checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from softcpt_dist.config import DataConfig, MethodConfig, ModelConfig, OptimConfig, PromptConfig, TrainConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.files import atomic_write_text
from softcpt_dist.model.methods import method_label

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
CHECKPOINT_NAME = "prompt_checkpoint.pt"
LATEST = "latest"
TRAIN_STATE = "train_state.pt"  # epoch, step, sampler position, schedule, history, meta (rank 0 writes)
STATE_KEYS = ("epoch", "step", "sampler", "skipped", "schedule_steps", "history", "epoch_totals", "epoch_seconds",
              "engine", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or made for a different setup."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file holds objects whose unpickling could run code; it is never loaded."""


def read_state_file(path: Path, allowed: Sequence[type] = (), map_location="cpu", mmap: bool = False):
    """``torch.load(weights_only=True)``: tensors, plain containers and the ``allowed`` state classes only,
    so no file can run code; any failure is a ``CheckpointError`` naming the file."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip archives, EOFError, refused globals, ...
        if "Unsupported global" in str(err):  # a class or callable to import: refused (a damaged stream is not)
            raise UnsafeCheckpoint(f"refusing {path}: it holds objects other than tensors and plain containers, "
                                   f"and loading them could run code ({str(err).splitlines()[-1][:200]})") from err
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from err


# Changed on resume, these take effect from the resume point on (the schedule is recomputed from them,
# momentum and weight decay are set on the restored optimizer), and the log says so. Every other
# recorded setting shapes the data or the loss, or the restored state itself: a change is refused.
APPLIED_ON_RESUME = ("optim.lr", "optim.epochs", "optim.schedule", "optim.warmup_epochs", "optim.warmup_type",
                     "optim.warmup_lr", "optim.momentum", "optim.weight_decay")


def resume_settings(model: ModelConfig, optim: OptimConfig, data: DataConfig, train: TrainConfig,
                    train_samples: Sequence) -> Dict:
    """Settings recorded with a training checkpoint and compared on resume (besides meta, engine and
    sampler settings): the frozen weights, the optimizer and schedule, and what shapes the data and the
    loss -- down to the exact training images (few-shot subsets depend on the seed)."""
    digest = hashlib.sha256("\n".join(f"{s.path}\x1f{s.task}\x1f{s.label}" for s in train_samples).encode())
    return {"model.pretrained": model.pretrained, "model.precision": model.precision,
            **{f"optim.{k}": v for k, v in asdict(optim).items()}, "data.train_augment": data.train_augment,
            "data.cache.train_views": data.cache.train_views if data.cache.enabled else 0,
            "data.train_images": f"{len(train_samples)} images, sha256 {digest.hexdigest()[:16]}",
            "train.task_weights": dict(train.task_weights) if train.task_weights else None}


def checkpoint_meta(model: ModelConfig, method: MethodConfig, prompt: PromptConfig, group: TaskGroup,
                    data: Optional[DataConfig] = None) -> Dict:
    """What a checkpoint must agree on to be loaded: backbone, method, prompt settings, task list, and which
    half of the classes and tasks (``data.subsample_*``) it was made on."""
    data = data or DataConfig()
    return {"format": FORMAT_VERSION, "arch": model.arch, "method": method_label(method),
            "prompt": {**asdict(prompt), "meta_net": method.meta_net, "meta_hidden": method.meta_hidden},
            "tasks": [{"key": t.key, "name": t.name, "classes": list(t.classnames)} for t in group.tasks],
            "subsample": {"classes": data.subsample_classes, "tasks": data.subsample_tasks}}


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


MANIFEST = "manifest.json"  # sha256 of every file of a training checkpoint tag, written last


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(tag_dir: Path) -> None:
    """Record the checksum of every file in ``tag_dir``, so that damage anywhere (even inside tensor data,
    which loads without complaint) is found before resuming from it."""
    files = {p.name: _sha256(p) for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(tag_dir / MANIFEST, json.dumps({"files": files}, indent=1))


def manifest_problem(tag_dir: Path) -> Optional[str]:
    """Why ``tag_dir`` does not match its manifest (a file missing or damaged), or None (also without one:
    checkpoints written before manifests existed)."""
    if not (tag_dir / MANIFEST).is_file():
        return None
    try:
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"cannot read {tag_dir / MANIFEST}: {err}"
    for name, digest in files.items():
        if not (tag_dir / name).is_file():
            return f"training checkpoint {tag_dir} lacks {name}"
        if _sha256(tag_dir / name) != digest:
            return f"{tag_dir / name} does not match its checksum in {MANIFEST}: the file is damaged"
    return None


def check_meta(saved: Dict, expected: Dict, where: str, transferable: Sequence[str] = ()) -> None:
    """Refuse state made for another backbone, method, prompt setting or task list, naming the difference.

    ``transferable`` ("classes", "tasks"): what the method can score without having trained on it. A
    checkpoint made on the base half of those may then be evaluated on the new half (base-to-new classes,
    unseen tasks): its class lists (or task list) are not compared."""
    for key in ("arch", "method"):
        if saved.get(key) != expected[key]:
            raise CheckpointError(f"{where} was made for {key}={saved.get(key)!r}, this run has {key}={expected[key]!r}")
    got_prompt, want_prompt = saved.get("prompt") or {}, expected["prompt"]
    before = asdict(PromptConfig())  # a setting newer than the checkpoint had its default value then
    for key in sorted(set(got_prompt) | set(want_prompt)):
        got = got_prompt.get(key, before.get(key))
        if got != want_prompt.get(key):
            raise CheckpointError(f"{where} was made with prompt setting {key}={got!r}, "
                                  f"this run has {key}={want_prompt.get(key)!r}")
    transfer = _transfer(saved.get("subsample") or {}, expected.get("subsample") or {}, where, expected["method"],
                         transferable)
    if "tasks" in transfer:
        return
    got, want = saved.get("tasks", []), expected["tasks"]
    if "classes" in transfer:
        got, want = ([{k: v for k, v in t.items() if k != "classes"} for t in ts] for ts in (got, want))
    if [t["key"] for t in got] != [t["key"] for t in want]:
        raise CheckpointError(f"{where} was made for tasks {[t['key'] for t in got]}, "
                              f"this run has {[t['key'] for t in want]}")
    for g, w in zip(got, want):
        if g != w:
            field = next(k for k in ("name", "classes") if g.get(k) != w.get(k))
            raise CheckpointError(f"{where}: task {w['key']!r} differs in its {field}: "
                                  f"{g.get(field)!r} vs {w.get(field)!r}")


def _transfer(got: Dict, want: Dict, where: str, method: str, transferable: Sequence[str]) -> Tuple[str, ...]:
    """The halves a checkpoint made on base classes / tasks is evaluated on the new half of; any other
    difference in ``data.subsample_*`` is refused (checkpoints predating the key were made on all)."""
    out = []
    for what in ("classes", "tasks"):
        g, w = got.get(what, "all"), want.get(what, "all")
        if g == w:
            continue
        if (g, w) != ("base", "new"):
            raise CheckpointError(f"{where} was made with data.subsample_{what}={g}, this run has "
                                  f"data.subsample_{what}={w}" + (" (new data is scored by checkpoints made on the "
                                                                   "base half)" if w == "new" else ""))
        if what not in transferable:
            raise CheckpointError(f"{where}: {method} keeps learnable contexts of each trained "
                                  f"{what[:-1] if what == 'tasks' else 'class'}, so it cannot score the new "
                                  f"{what} (data.subsample_{what}=new)")
        out.append(what)
    return tuple(out)
