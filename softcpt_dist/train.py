"""The training loop for prompt methods (SoftCPT, CoOp), on one rank or many.

One iteration per micro-batch: frozen image features of the batch (or cached ones), text features
of the classes from the learnable prompts, cosine logits, per-task cross-entropy, backward through
the engine; the optimizer steps at accumulation boundaries (``k`` steps under
``optim.official_stepping``). The lr schedule advances once per epoch.

Robustness: a NaN/inf loss on any rank stops the run (or skips the step, ``train.on_nonfinite``)
before anything is written; SIGTERM/SIGUSR1 make every rank stop at the same step, save a
checkpoint and raise ``Preempted``; training checkpoints hold everything needed to resume mid-epoch.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcpt_dist import distributed as D
from softcpt_dist.checkpoint import CheckpointError, check_meta, latest_tag, mark_latest
from softcpt_dist.config import Config
from softcpt_dist.data.dataset import MultiTaskImageDataset, Sample
from softcpt_dist.data.features import CachedFeatureDataset
from softcpt_dist.data.sampler import TaskBalancedBatchSampler
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.engine import TrainEngine, memory_report, micro_batch_size
from softcpt_dist.loss import multitask_cross_entropy
from softcpt_dist.progress import progress

logger = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved, requeue and resume
TRAIN_STATE = "train_state.pt"  # epoch, step, sampler position, schedule, history, meta (rank 0 writes)
STATE_KEYS = ("epoch", "step", "sampler", "skipped", "schedule_steps", "history", "epoch_totals", "epoch_seconds",
              "engine", "meta")


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint was saved and the job should be requeued."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; only effective before CUDA initializes.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def make_loader(samples: List[Sample], transform, batch_size: int, seed: int, num_workers: int = 0,
                features: Optional[torch.Tensor] = None) -> DataLoader:
    """Evaluation loader in sample order: images through ``transform``, or cached ``features``."""
    dataset = (CachedFeatureDataset(samples, features) if features is not None
               else MultiTaskImageDataset(samples, transform))
    num_workers = 0 if features is not None else num_workers  # features are in memory: workers only add IPC
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=_seed_worker if num_workers else None)


def make_train_loader(cfg: Config, samples: List[Sample], transform, features: Optional[torch.Tensor] = None,
                      rank: int = 0, world_size: int = 1,
                      batch_size: Optional[int] = None) -> Tuple[DataLoader, TaskBalancedBatchSampler]:
    """Training loader driven by the task-balanced sampler (this rank's shard of each epoch).

    ``batch_size``: this rank's micro-batch (default: the whole ``optim.batch_size``).
    """
    scfg = cfg.data.sampler
    dataset = (CachedFeatureDataset(samples, features, cfg.train.seed) if features is not None
               else MultiTaskImageDataset(samples, transform, seed=cfg.train.seed))
    sampler = TaskBalancedBatchSampler([s.task for s in samples], batch_size or cfg.optim.batch_size,
                                       seed=cfg.train.seed, mode=scfg.mode, temperature=scfg.temperature,
                                       tasks_per_batch=scfg.tasks_per_batch, world_size=world_size, rank=rank)
    workers = 0 if features is not None else cfg.data.num_workers  # in-memory features: workers only add IPC
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        worker_init_fn=_seed_worker if workers else None)
    return loader, sampler


def batch_classes(group: TaskGroup, tasks: torch.Tensor) -> torch.Tensor:
    """Global class indices of the tasks present in a batch (task-grouped micro-batches)."""
    present = torch.unique(tasks).tolist()
    return torch.cat([torch.arange(group.offsets[t], group.offsets[t] + group.tasks[t].num_classes)
                      for t in present]).to(tasks.device)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class StopSignals:
    """Remembers SIGTERM / SIGUSR1 (SLURM's warning signal) while installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: cannot install handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._previous.items():
            # Leaving on Preempted: the job is exiting with EXIT_PREEMPTED. A late SIGTERM (srun's
            # --kill-on-bad-exit reacts to another rank's exit 75) must not turn that into 143.
            preempted = exc_type is not None and issubclass(exc_type, Preempted)
            signal.signal(sig, signal.SIG_IGN if preempted else handler)


def _rng_state() -> Dict:
    """RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingCheckpoints:
    """Training checkpoints of one scope: save at step boundaries, find and load the latest."""

    def __init__(self, folder: Path, keep: int, meta: Dict):
        self.folder, self.keep, self.meta = Path(folder), keep, meta

    def save(self, engine: TrainEngine, tag: str, client_state: Dict) -> None:
        """All ranks write ``tag``; ``latest`` moves to it only when every rank has finished."""
        if D.rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        D.barrier()
        if D.broadcast_object(latest_tag(self.folder) if D.rank() == 0 else None) == tag:
            return  # this exact state is saved already (resumed there): never rewrite what `latest` names
        engine.save(self.folder, tag)
        torch.save(_rng_state(), self.folder / tag / f"rng_rank{D.rank()}.pt")
        if D.rank() == 0:
            torch.save({**client_state, "meta": self.meta}, self.folder / tag / TRAIN_STATE)
        D.barrier()  # every rank has written: only now does `latest` move
        if D.rank() == 0:
            mark_latest(self.folder, tag, self.keep)
        D.barrier()

    def load_latest(self, engine: TrainEngine, sampler: TaskBalancedBatchSampler, source: str) -> Optional[Dict]:
        """Check the saved state against this run (meta, sampler settings incl. world size), then load it."""
        if source == "latest":  # rank 0 reads `latest` and tells the others: all load the same state
            folder, tag = self.folder, D.broadcast_object(latest_tag(self.folder) if D.rank() == 0 else None)
        else:
            folder, tag = _split_tag(Path(source))
        if tag is None:
            logger.info("train.resume=latest: no checkpoint in %s, starting fresh", self.folder)
            return None
        where = f"training checkpoint {folder / tag}"
        state_file = folder / tag / TRAIN_STATE
        if not state_file.is_file():
            raise CheckpointError(f"{where} has no {TRAIN_STATE}: not a complete training checkpoint")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        missing = sorted(set(STATE_KEYS) - set(state))
        if missing:
            raise CheckpointError(f"{where} lacks {missing}: it is incomplete or from an older version")
        check_meta(state["meta"], self.meta, where)
        for key, value in engine.settings().items():
            if state["engine"].get(key) != value:
                raise CheckpointError(f"{where} was made with {key}={state['engine'].get(key)!r}, this run has "
                                      f"{key}={value!r}")
        sampler.load_state_dict(state["sampler"])  # refuses other data, sampler settings or world size
        engine.load(folder, tag)
        rng_file = folder / tag / f"rng_rank{D.rank()}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        if folder == self.folder and source != "latest":
            # Resumed from an older tag: the newer ones belong to the abandoned continuation.
            D.barrier()
            if D.rank() == 0:
                for newer in (p for p in self.folder.iterdir() if p.is_dir() and p.name > tag):
                    shutil.rmtree(newer, ignore_errors=True)
                mark_latest(self.folder, tag, self.keep)
            D.barrier()
        logger.info("resumed from %s: epoch %d, step %d", where, state["epoch"] + 1, state["step"])
        return state


def _split_tag(path: Path):
    if not path.is_dir():
        raise CheckpointError(f"train.resume: checkpoint folder not found: {path}")
    return path.parent, path.name


def train_prompts(cfg: Config, model, group: TaskGroup, train_samples: List[Sample], transform,
                  run=None, task_weights: Optional[torch.Tensor] = None, tag: str = "",
                  features: Optional[torch.Tensor] = None, checkpoints: Optional[TrainingCheckpoints] = None,
                  signals: Optional["StopSignals"] = None) -> Tuple[List[Dict], TrainEngine]:
    """Train ``model.method`` on this rank's shards; returns the per-epoch records and the engine.

    ``features``: cached image features of ``train_samples`` (``[N, D]`` or ``[N, V, D]``); the
    image encoder is then skipped. With task-grouped micro-batches only the batch's tasks' class
    prompts are encoded. ``signals``: the run's stop-signal catcher (one is installed here if None).
    """
    if signals is None:
        with StopSignals() as own:
            return train_prompts(cfg, model, group, train_samples, transform, run, task_weights, tag, features,
                                 checkpoints, own)
    ocfg, world, rank = cfg.optim, D.world_size(), D.rank()
    micro = micro_batch_size(cfg, world)
    gas = cfg.engine.grad_accum_steps
    loader, sampler = make_train_loader(cfg, train_samples, transform, features, rank, world, micro)
    engine = TrainEngine(cfg, model, world, micro)
    device = model.backbone.device
    class_task = group.class_task().to(device)
    grouped = cfg.data.sampler.tasks_per_batch > 0
    steps_per_epoch = sampler.steps_per_epoch - sampler.steps_per_epoch % gas  # whole optimizer steps only
    if steps_per_epoch == 0:
        raise ValueError(f"{tag}an epoch has {sampler.steps_per_epoch} micro-batches per rank, fewer than "
                         f"engine.grad_accum_steps={gas}")
    scope = tag.strip(": ") or "joint"
    history: List[Dict] = []
    start_epoch, step, skipped = 0, 0, 0
    # Progress of the current epoch: loss sum, correct, samples (summed over ranks at the end), seconds.
    carried = torch.zeros(3, dtype=torch.float64)
    carried_seconds = 0.0
    if checkpoints is not None and cfg.train.resume:
        state = checkpoints.load_latest(engine, sampler, cfg.train.resume)
        if state is not None:
            start_epoch, step, history, skipped = state["epoch"], state["step"], state["history"], state["skipped"]
            engine.schedule.steps = state["schedule_steps"]
            engine.schedule._apply()
            if rank == 0:  # saved totals are global: count them once
                carried = state["epoch_totals"]
            carried_seconds = state["epoch_seconds"]
    mem = memory_report(engine.module, cfg.model.device)
    logger.info("%straining %s learnable parameters on %d %s of %d tasks: %d rank(s) x micro-batch %d x %d "
                "accumulation = global batch %d, %d iterations/epoch (sampler %s%s), %d epochs, ZeRO stage %d; "
                "rank 0 holds %.1f MiB frozen + %.2f MiB learnable parameters", tag,
                f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.learnable_parameters().values()):,}",
                len(train_samples), "cached feature rows" if features is not None else "images", len(group), world,
                micro, gas, micro * gas * world, steps_per_epoch // gas, cfg.data.sampler.mode,
                f", <= {cfg.data.sampler.tasks_per_batch} tasks/batch" if grouped else "", ocfg.epochs,
                cfg.engine.zero_stage, mem["frozen_param_bytes"] / 2**20, mem["learnable_param_bytes"] / 2**20)
    engine.train()

    def save(epoch: int, consumed: int, totals: torch.Tensor, seconds: float, end_of_epoch: bool = False) -> None:
        totals = D.all_reduce(totals.clone())  # global sums; on resume rank 0 carries them, other ranks start at 0
        checkpoints.save(engine, f"step{step:09d}" + ("-end" if end_of_epoch else ""), {
            "epoch": epoch, "step": step, "sampler": sampler.state_dict(consumed), "skipped": skipped,
            "schedule_steps": engine.schedule.steps, "history": history, "epoch_totals": totals,
            "epoch_seconds": seconds, "engine": engine.settings()})

    for epoch in range(start_epoch, ocfg.epochs):
        sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        lr = engine.schedule.lr
        t0 = time.perf_counter()
        totals, carried = carried, torch.zeros(3, dtype=torch.float64)
        prior_seconds, carried_seconds = carried_seconds, 0.0
        todo = steps_per_epoch - sampler.start_step
        bar = progress(loader, desc=f"{tag}epoch {epoch + 1}/{ocfg.epochs}", enabled=cfg.train.progress and rank == 0,
                       total=todo)
        consumed = 0
        for inputs, tasks, labels, _ in (bar if todo > 0 else ()):
            tasks = tasks.to(device)
            targets = group.global_labels(tasks, labels.to(device))
            batch_task = class_task
            if grouped:
                class_index = batch_classes(group, tasks)
                position = torch.full((group.num_classes,), -1, dtype=torch.long, device=device)
                position[class_index] = torch.arange(len(class_index), device=device)
                logits = engine(inputs, class_index=class_index)
                targets, batch_task = position[targets], class_task[class_index]
            else:
                logits = engine(inputs)
            loss = multitask_cross_entropy(logits, tasks, targets, batch_task, task_weights)
            # One collective per step: any rank's non-finite loss or stop signal concerns all ranks,
            # and the logged loss is the global batch's (sum over ranks / global batch size).
            finite = bool(torch.isfinite(loss))
            flags = D.all_reduce(torch.tensor([float(not finite), float(signals.received is not None),
                                               loss.item() * inputs.shape[0] if finite else 0.0,
                                               float(inputs.shape[0])], dtype=torch.float64))
            global_loss = float(flags[2] / flags[3])
            consumed += 1
            if flags[0] > 0:
                if cfg.train.on_nonfinite == "stop":
                    raise FloatingPointError(f"{tag}non-finite loss (rank {rank}: {loss.item()}) at epoch "
                                             f"{epoch + 1}, step {step}; no checkpoint was written for it "
                                             "(train.on_nonfinite=skip skips such steps)")
                skipped += 1
                logger.warning("%sskipping a step with a non-finite loss at epoch %d, step %d", tag, epoch + 1, step)
            else:
                engine.backward(loss)
                engine.step()
                with torch.no_grad():
                    own = batch_task.unsqueeze(0) == tasks.unsqueeze(1)
                    pred = logits.masked_fill(~own, float("-inf")).argmax(1)
                    totals += torch.tensor([loss.item() * inputs.shape[0], float((pred == targets).sum()),
                                            float(inputs.shape[0])], dtype=torch.float64)
            step += 1
            boundary = step % gas == 0
            if run is not None and step % cfg.train.log_every == 0:
                run.log_metrics({"kind": "step", "scope": scope, "epoch": epoch + 1, "step": step,
                                 "loss": global_loss, "lr": lr})
            bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{lr:.2e}")
            stop = flags[1] > 0
            if checkpoints is not None and boundary and consumed < todo and (stop or (
                    cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)):
                save(epoch, consumed, totals, prior_seconds + time.perf_counter() - t0)
            if stop and boundary and consumed < todo:
                raise Preempted(f"{tag}stop signal received: " + (f"checkpoint saved at epoch {epoch + 1}, step {step}"
                                                                   if checkpoints is not None else "no checkpointing"))
            if consumed == todo:
                break
        totals = D.all_reduce(totals)
        for _ in range(engine.k):
            engine.schedule.step()
        elapsed = prior_seconds + time.perf_counter() - t0
        record = {"kind": "epoch", "scope": scope, "epoch": epoch + 1, "step": step,
                  "loss": float(totals[0] / max(totals[2], 1)), "train_acc": float(100 * totals[1] / max(totals[2], 1)),
                  "lr": lr, "samples_per_s": float(totals[2]) / elapsed if elapsed > 0 else float("nan")}
        history.append(record)
        if run is not None:
            run.log_metrics(record)
        logger.info("%sepoch %d/%d loss %.4f train acc %.1f%% lr %.3g %.1f samples/s", tag, epoch + 1, ocfg.epochs,
                    record["loss"], record["train_acc"], lr, record["samples_per_s"])
        if checkpoints is not None:
            sampler.set_epoch(epoch + 1)
            save(epoch + 1, 0, torch.zeros(3, dtype=torch.float64), 0.0, end_of_epoch=True)
        if epoch + 1 < ocfg.epochs and D.any_rank(signals.received is not None):
            raise Preempted(f"{tag}stop signal received: " + (f"checkpoint saved at the end of epoch {epoch + 1}"
                                                               if checkpoints is not None else "no checkpointing"))
    if skipped:
        logger.warning("%s%d step(s) with a non-finite loss were skipped", tag, skipped)
    per_rank = D.all_gather_objects(memory_report(engine.module, cfg.model.device))
    for r, mem in enumerate(per_rank):
        logger.info("%smemory rank %d: frozen params %.1f MiB, learnable params %.2f MiB, peak %.1f MiB", tag, r,
                    mem["frozen_param_bytes"] / 2**20, mem["learnable_param_bytes"] / 2**20,
                    mem.get("peak_allocated_bytes", mem.get("peak_rss_bytes", 0)) / 2**20)
    if run is not None:
        run.write_json(f"memory_{scope}.json", {"zero_stage": cfg.engine.zero_stage, "ranks": per_rank})
    engine.train(False)
    return history, engine
