"""Training checkpoints of one scope: everything needed to resume mid-epoch, saved so that a kill,
a full disk or a corrupt file never costs more than the last complete checkpoint."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from softcpt_dist import distributed as D
from softcpt_dist.files import WriteError, write_error
from softcpt_dist.seeding import rng_state, set_rng_state
from softcpt_dist.training.checkpoint.common import (APPLIED_ON_RESUME, LATEST, STATE_KEYS, TRAIN_STATE,
                                                     CheckpointError, UnsafeCheckpoint, check_meta, latest_tag,
                                                     manifest_problem, mark_latest, read_state_file, write_manifest)

logger = logging.getLogger(__name__)


class TrainingCheckpoints:
    """Training checkpoints of one scope: save at step boundaries, check and restore on resume.

    ``settings``: ``resume_settings`` of this run; ``on_resumed``: called once the resume checks have
    passed (or nothing was found to resume), before training continues."""

    def __init__(self, folder: Path, keep: int, meta: Dict, settings: Optional[Dict] = None,
                 on_resumed: Optional[Callable[[], None]] = None):
        self.folder, self.keep, self.meta, self.settings = Path(folder), keep, meta, settings or {}
        self.on_resumed = on_resumed or (lambda: None)

    def save(self, engine, tag: str, client_state: Dict) -> None:
        """All ranks write ``tag``; ``latest`` moves to it only when every rank has finished. A failed write
        (e.g. a full disk) removes the partial tag and leaves ``latest`` on the last complete one."""
        if D.rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        D.barrier()
        latest = D.broadcast_object(latest_tag(self.folder) if D.rank() == 0 else None)
        if latest == tag:
            return  # this exact state is saved already (resumed there): never rewrite what `latest` names
        error = None
        try:
            engine.save(self.folder, tag)
            torch.save(rng_state(), self.folder / tag / f"rng_rank{D.rank()}.pt")
            if D.rank() == 0:
                torch.save({**client_state, "meta": self.meta, "settings": self.settings}, self.folder / tag / TRAIN_STATE)
        except (OSError, RuntimeError) as err:
            error = write_error(self.folder / tag, err)
        failed = D.any_rank(error is not None)  # every rank has written (or one failed): only now does `latest` move
        if not failed and D.rank() == 0:
            try:
                write_manifest(self.folder / tag)
                mark_latest(self.folder, tag, self.keep)
            except WriteError as err:
                error = err
        if failed or D.any_rank(error is not None):
            if D.rank() == 0:
                shutil.rmtree(self.folder / tag, ignore_errors=True)
            where = f"training checkpoint {self.folder / tag}"
            raise WriteError(f"{error or f'another rank could not write {where}'}; latest still names {latest}")

    def resume(self, engine, sampler, source: str) -> Optional[Dict]:
        """Check the saved state against this run (meta, settings, engine and sampler settings incl. world
        size), then restore the engine, sampler, lr schedule and RNGs; returns the loop's saved state.

        ``latest``: rank 0 picks the newest complete tag that reads back (falling back past a corrupt or
        truncated one, saying so) and tells the other ranks, so that all load the same state."""
        if source == "latest":
            folder, (tag, problem) = self.folder, D.broadcast_object(
                self._newest_readable(engine) if D.rank() == 0 else None)
        else:
            folder, tag = Path(source).parent, Path(source).name
            problem = D.broadcast_object(self._unreadable(Path(source), engine) if D.rank() == 0 else None)
        if problem:
            raise (UnsafeCheckpoint if problem.startswith("refusing") else CheckpointError)(problem)
        if tag is None:
            logger.info("train.resume=latest: no checkpoint in %s, starting fresh", self.folder)
            self.on_resumed()
            return None
        where = f"training checkpoint {folder / tag}"
        state = read_state_file(folder / tag / TRAIN_STATE)
        self._check(state, engine, where)
        sampler.load_state_dict(state["sampler"])  # refuses other data, sampler settings or world size
        try:
            loaded = engine.load(folder, tag)
        except Exception as err:  # e.g. a missing partition file: DeepSpeed asserts
            raise CheckpointError(f"DeepSpeed could not load the training checkpoint {folder / tag}: "
                                  f"{type(err).__name__}: {err}") from err
        if not loaded:
            raise CheckpointError(f"DeepSpeed could not load the training checkpoint {folder / tag}")
        engine.apply_optimizer_settings()  # this run's momentum and weight decay (see APPLIED_ON_RESUME)
        engine.schedule.load_state_dict({"steps": state["schedule_steps"]})
        set_rng_state(read_state_file(folder / tag / f"rng_rank{D.rank()}.pt"))
        if folder.resolve() == self.folder.resolve() and source != "latest":
            self._discard_newer_than(tag)
        logger.info("resumed from %s: epoch %d, step %d", where, state["epoch"] + 1, state["step"])
        self.on_resumed()
        return state

    def _check(self, state: Dict, engine, where: str) -> None:
        check_meta(state["meta"], self.meta, where)
        saved = state.get("settings")
        if saved is None:
            logger.warning("%s predates recorded training settings: changes to optim.* and the data settings are "
                           "not checked", where)
        changed = {k: (saved.get(k), v) for k, v in self.settings.items() if saved is not None and saved.get(k) != v}
        for key in sorted(set(changed) & set(APPLIED_ON_RESUME)):
            logger.warning("%s: %s changed from %r to %r; the new value applies from the resume point on", where,
                           key, *changed.pop(key))
        changed.update({k: (state["engine"].get(k), v) for k, v in engine.settings().items()
                        if state["engine"].get(k) != v})
        if changed:
            raise CheckpointError(f"{where} was made with " + "; ".join(
                f"{k}={old!r}, this run has {k}={new!r}" for k, (old, new) in changed.items())
                + " (resume with the checkpoint's settings, or start a new run)")

    def _newest_readable(self, engine) -> Tuple[Optional[str], Optional[str]]:
        """``(tag, None)`` for the newest complete readable tag (``latest`` then names it), ``(None, None)`` if
        nothing was saved yet, ``(None, problem)`` if nothing reads back (an unsafe file is never skipped)."""
        tags = sorted((p.name for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("step")),
                      reverse=True) if self.folder.is_dir() else []
        marker = self.folder / LATEST
        named = marker.read_text().strip() if marker.is_file() else ""
        if named in tags:  # tags after `latest` are saves that never completed; before it, complete ones
            candidates = [named] + [t for t in tags if t < named]
        else:  # `latest` lost or damaged: every tag, newest first, each checked for completeness
            if tags:
                logger.warning("train.resume=latest: %s is %s; looking for the newest complete checkpoint",
                               marker, f"{named!r}, not a checkpoint here" if marker.is_file() else "missing")
            candidates = tags
        if not candidates:
            return None, None
        problems: List[str] = []
        for tag in candidates:
            problem = self._unreadable(self.folder / tag, engine)
            if problem is None:
                if problems:
                    logger.warning("train.resume=latest: %s; resuming from the older checkpoint %s instead (the "
                                   "unreadable ones are kept as unreadable-<tag>)", "; ".join(problems), tag)
                    for bad in (t for t in candidates[:len(problems)] if (self.folder / t).is_dir()):
                        (self.folder / bad).rename(self.folder / f"unreadable-{bad}")
                    mark_latest(self.folder, tag, self.keep)
                return tag, None
            if problem.startswith("refusing"):
                return None, problem
            problems.append(problem)
        return None, f"no readable training checkpoint in {self.folder}: " + "; ".join(problems)

    def _unreadable(self, path: Path, engine) -> Optional[str]:
        """Why the checkpoint ``path`` cannot be resumed from (a file named), or None."""
        if not path.is_dir():
            return f"train.resume: checkpoint folder not found: {path}"
        if not (path / TRAIN_STATE).is_file():
            return f"training checkpoint {path} has no {TRAIN_STATE}: not a complete training checkpoint"
        try:
            for f in sorted(path.glob("*.pt")):
                content = read_state_file(f, engine.state_classes(), mmap=True)
                missing = sorted(set(STATE_KEYS) - set(content)) if f.name == TRAIN_STATE else []
                if missing:
                    return f"training checkpoint {path} lacks {missing}: it is incomplete or from an older version"
                if f.name == TRAIN_STATE:
                    ranks = int(content["sampler"].get("world_size", 1))
        except CheckpointError as err:
            return str(err)
        absent = [f"rng_rank{r}.pt" for r in range(ranks) if not (path / f"rng_rank{r}.pt").is_file()]
        if absent:
            return f"training checkpoint {path} lacks {absent}: not every rank finished writing it"
        return manifest_problem(path)

    def _discard_newer_than(self, tag: str) -> None:
        """Resumed from an older tag: the newer ones belong to the abandoned continuation."""
        D.barrier()
        if D.rank() == 0:
            for newer in (p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("step")
                          and p.name > tag):
                shutil.rmtree(newer, ignore_errors=True)
            mark_latest(self.folder, tag, self.keep)
        D.barrier()
