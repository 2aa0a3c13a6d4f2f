"""The training loop for prompt methods (SoftCPT, CoOp), on one rank or many.

One iteration per micro-batch: frozen image features of the batch (or cached ones), text features
of the classes from the learnable prompts, cosine logits, per-task cross-entropy, backward through
the engine; the optimizer steps at accumulation boundaries (``k`` steps under
``optim.official_stepping``). The lr schedule advances once per epoch.

Robustness: a NaN/inf loss on any rank stops the run (or skips the step, ``train.on_nonfinite``)
before anything is written; a stop signal makes every rank stop at the same step, save a
checkpoint and raise ``Preempted``. Setting up (loader, engine, resume) is ``trainer.py``'s job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from softcpt_dist import distributed as D
from softcpt_dist.config import Config
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.loss import TaskTargets, column_positions
from softcpt_dist.step_phases import NULL_TIMER
from softcpt_dist.progress import progress
from softcpt_dist.training.class_sampling import ClassSampler
from softcpt_dist.training.signals import Preempted, StopSignals

logger = logging.getLogger(__name__)


def batch_classes(group: TaskGroup, tasks: torch.Tensor) -> torch.Tensor:
    """Global class indices of the tasks present in a batch (task-grouped micro-batches)."""
    present = torch.unique(tasks).tolist()
    return torch.cat([torch.arange(group.offsets[t], group.offsets[t] + group.tasks[t].num_classes)
                      for t in present]).to(tasks.device)


def _zeros() -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples


@dataclass
class LoopState:
    """Where training stands; a training checkpoint restores it.

    ``totals``/``seconds``: the running epoch's sums and time before a resume (global sums: on
    resume only rank 0 carries them, so that summing over ranks counts them once)."""

    epoch: int = 0
    step: int = 0
    skipped: int = 0
    history: List[Dict] = field(default_factory=list)
    totals: torch.Tensor = field(default_factory=_zeros)
    seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, state: Dict, rank: int) -> "LoopState":
        return cls(state["epoch"], state["step"], state["skipped"], state["history"],
                   state["epoch_totals"] if rank == 0 else _zeros(), state["epoch_seconds"])


class TrainLoop:
    """Epochs of micro-batches through a ``TrainEngine``; ``run`` returns the per-epoch records."""

    def __init__(self, engine, loader, job, cfg: Config, signals: StopSignals, steps_per_epoch: int,
                 timer=NULL_TIMER):
        """``job``: the scope's ``ScopeJob`` (group, task weights, scope name, run folder, checkpoints);
        ``cfg``: the run's config (``train``, ``optim.epochs``, ``engine.grad_accum_steps``)."""
        self.engine, self.loader, self.sampler, self.group = engine, loader, loader.batch_sampler, job.group
        self.cfg = cfg.train
        self.timer = timer  # the profiler's (softcpt-dist profile): backward / optimizer phases
        self.epochs, self.steps_per_epoch, self.gas = cfg.optim.epochs, steps_per_epoch, cfg.engine.grad_accum_steps
        self.signals, self.run_dir, self.task_weights, self.checkpoints = signals, job.run, job.task_weights, \
            job.checkpoints
        scope = job.scope
        self.scope, self.tag = scope, "" if scope == "joint" else f"{scope}: "
        self.device = engine.module.backbone.device
        self.class_task = self.group.class_task().to(self.device)
        self.grouped = self.sampler.tasks_per_batch > 0
        rate = cfg.method.class_sample_rate
        self.class_sampler = ClassSampler(self.group, rate, cfg.train.seed) if rate > 0 else None

    def run(self, state: LoopState) -> List[Dict]:
        self.state = state
        for epoch in range(state.epoch, self.epochs):
            self.begin_epoch(epoch)
            lr, t0, text0 = self.engine.schedule.lr, time.perf_counter(), self.counters()
            totals, state.totals = state.totals, _zeros()
            prior_seconds, state.seconds = state.seconds, 0.0
            todo = self.steps_per_epoch - self.sampler.start_step
            bar = progress(self.loader, desc=f"{self.tag}epoch {epoch + 1}/{self.epochs}",
                           enabled=self.cfg.progress and D.rank() == 0, total=todo)
            consumed = 0
            for inputs, tasks, labels, _ in (bar if todo > 0 else ()):
                consumed += 1
                self.engine.module.measure_activations = consumed == todo  # the epoch record's text activations
                stop = self.step(inputs, tasks, labels, totals, epoch, lr, bar)
                boundary, more = state.step % self.gas == 0, consumed < todo
                if self.checkpoints is not None and boundary and more and (stop or (
                        self.cfg.checkpoint_every and state.step % self.cfg.checkpoint_every == 0)):
                    self._save(epoch, consumed, totals, prior_seconds + time.perf_counter() - t0)
                if stop and boundary and more:
                    raise Preempted(f"{self.tag}stop signal received: " + (
                        f"checkpoint saved at epoch {epoch + 1}, step {state.step}"
                        if self.checkpoints is not None else "no checkpointing"))
                if consumed == todo:
                    break
            text = self._text_record(text0, consumed)
            self._end_epoch(epoch, D.all_reduce(totals), lr, prior_seconds + time.perf_counter() - t0, text)
        if state.skipped:
            logger.warning("%s%d step(s) with a non-finite loss were skipped", self.tag, state.skipped)
        return state.history

    def begin_epoch(self, epoch: int) -> None:
        """Seed the sampler and the dataset's augmentation (or cached-view choice) for ``epoch``."""
        self.sampler.set_epoch(epoch)
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(epoch)

    def step(self, inputs, tasks, labels, totals: torch.Tensor, epoch: int, lr: float, bar=None) -> bool:
        """One micro-batch (``run`` calls it; so does the profiler); returns whether any rank received a
        stop signal. Needs ``self.state`` (``run`` sets it)."""
        state = self.state
        tasks = tasks.to(self.device)
        targets = self.group.global_labels(tasks, labels.to(self.device))
        batch_task = self.class_task
        class_index = None
        if self.class_sampler is not None:  # the sampled classes of the batch's tasks (a subset of grouped's)
            class_index = self.class_sampler(targets, state.step)
        elif self.grouped:  # only the batch's tasks' classes are encoded
            class_index = batch_classes(self.group, tasks)
        if class_index is not None:  # columns renumbered
            position = column_positions(class_index, self.group.num_classes)
            targets, batch_task = position[targets], self.class_task[class_index]
        loss, pred = self.engine(inputs, class_index=class_index,
                                 targets=TaskTargets(tasks, batch_task, targets, self.task_weights))
        # One collective per step: any rank's non-finite loss or stop signal concerns all ranks,
        # and the logged loss is the global batch's (sum over ranks / global batch size).
        finite = bool(torch.isfinite(loss))
        flags = D.all_reduce(torch.tensor([float(not finite), float(self.signals.received is not None),
                                           loss.item() * inputs.shape[0] if finite else 0.0,
                                           float(inputs.shape[0])], dtype=torch.float64))
        global_loss = float(flags[2] / flags[3])
        if flags[0] > 0:
            if self.cfg.on_nonfinite == "stop":
                raise FloatingPointError(f"{self.tag}non-finite loss (rank {D.rank()}: {loss.item()}) at epoch "
                                         f"{epoch + 1}, step {state.step}; no checkpoint was written for it "
                                         "(train.on_nonfinite=skip skips such steps)")
            state.skipped += 1
            logger.warning("%sskipping a step with a non-finite loss at epoch %d, step %d", self.tag, epoch + 1,
                           state.step)
        else:
            with self.timer("backward"):
                self.engine.backward(loss)
            with self.timer("optimizer"):
                self.engine.step()
            with torch.no_grad():
                totals += torch.tensor([loss.item() * inputs.shape[0], float((pred == targets).sum()),
                                        float(inputs.shape[0])], dtype=torch.float64)
        state.step += 1
        if self.run_dir is not None and state.step % self.cfg.log_every == 0:
            self.run_dir.log_metrics({"kind": "step", "scope": self.scope, "epoch": epoch + 1, "step": state.step,
                                      "loss": global_loss, "lr": lr})
        if bar is not None:
            bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{lr:.2e}")
        return bool(flags[1] > 0)

    def counters(self) -> Dict[str, int]:
        """Running totals of this rank's text work and bytes exchanged, by kind (the epoch records' source)."""
        return {**self.engine.module.text_counters(), **self.engine.gradient_counters()}

    def _text_record(self, before: Dict[str, int], steps: int) -> Dict:
        """This epoch's text-side work per micro-batch step, every rank's: token positions encoded, bytes
        all-gathered (forward) and gradient bytes reduced (backward), autograd-saved text activations."""
        module, steps = self.engine.module, max(steps, 1)
        now = self.counters()
        mine = {k: (now[k] - before[k]) / steps for k in now}
        mine["activation_bytes"] = module.activation_bytes
        ranks = D.all_gather_objects(mine)
        return {"text_positions_per_step": [r["positions"] for r in ranks],
                "text_gather_bytes_per_step": ranks[0]["gathered_bytes"],
                "text_grad_reduce_bytes_per_step": ranks[0]["reduced_bytes"],
                "image_gather_bytes_per_step": ranks[0]["image_bytes"],
                "softmax_stats_bytes_per_step": ranks[0]["stats_bytes"],
                "grad_factor_bytes_per_step": ranks[0]["factor_bytes"],
                "grad_allreduce_bytes_per_step": ranks[0]["allreduce_bytes"],
                "text_activation_bytes": [r["activation_bytes"] for r in ranks]}

    def _end_epoch(self, epoch: int, totals: torch.Tensor, lr: float, elapsed: float, text: Dict) -> None:
        """Advance the schedule, record and log the epoch, save its checkpoint, honour a stop signal."""
        state = self.state
        for _ in range(self.engine.k):
            self.engine.schedule.step()
        record = {"kind": "epoch", "scope": self.scope, "epoch": epoch + 1, "step": state.step,
                  "loss": float(totals[0] / max(totals[2], 1)), "train_acc": float(100 * totals[1] / max(totals[2], 1)),
                  "lr": lr, "samples_per_s": float(totals[2]) / elapsed if elapsed > 0 else float("nan"), "seconds": elapsed, **text}
        state.history.append(record)
        if self.run_dir is not None:
            self.run_dir.log_metrics(record)
        logger.info("%sepoch %d/%d loss %.4f train acc %.1f%% lr %.3g %.1f samples/s", self.tag, epoch + 1,
                    self.epochs, record["loss"], record["train_acc"], lr, record["samples_per_s"])
        logger.info("%stext per step: token positions encoded per rank %s, received %.1f KiB of class features "
                    "+ %.1f KiB of their gradients + %.1f KiB of image features + %.1f KiB of softmax statistics; learnable "
                    "gradients: %.1f KiB of factors + %.1f KiB all-reduced; saved activations per rank %s MiB", self.tag,
                    "/".join(f"{p:.0f}" for p in text["text_positions_per_step"]),
                    text["text_gather_bytes_per_step"] / 2**10, text["text_grad_reduce_bytes_per_step"] / 2**10,
                    text["image_gather_bytes_per_step"] / 2**10, text["softmax_stats_bytes_per_step"] / 2**10,
                    text["grad_factor_bytes_per_step"] / 2**10, text["grad_allreduce_bytes_per_step"] / 2**10,
                    "/".join(f"{b / 2**20:.1f}" for b in text["text_activation_bytes"]))
        if self.checkpoints is not None:
            self.sampler.set_epoch(epoch + 1)
            self._save(epoch + 1, 0, _zeros(), 0.0, end_of_epoch=True)
        if epoch + 1 < self.epochs and D.any_rank(self.signals.received is not None):
            raise Preempted(f"{self.tag}stop signal received: " + (
                f"checkpoint saved at the end of epoch {epoch + 1}" if self.checkpoints is not None
                else "no checkpointing"))

    def _save(self, epoch: int, consumed: int, totals: torch.Tensor, seconds: float, end_of_epoch: bool = False):
        state, engine = self.state, self.engine
        totals = D.all_reduce(totals.clone())  # global sums; on resume rank 0 carries them, other ranks start at 0
        self.checkpoints.save(engine, f"step{state.step:09d}" + ("-end" if end_of_epoch else ""), {
            "epoch": epoch, "step": state.step, "sampler": self.sampler.state_dict(consumed),
            "skipped": state.skipped, "schedule_steps": engine.schedule.steps, "history": state.history,
            "epoch_totals": totals, "epoch_seconds": seconds, "engine": engine.settings()})
