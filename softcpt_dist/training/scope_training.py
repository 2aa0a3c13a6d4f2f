"""Training one scope's prompts: its job (model, samples, where it reports), loader and engine, resume
from a checkpoint, the loop, memory report. ``Trainer`` (``trainer.py``) builds the jobs of a run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from softcpt_dist import distributed as D
from softcpt_dist.config import Config, ConfigError
from softcpt_dist.data.dataset import Sample
from softcpt_dist.data.loaders import make_train_loader
from softcpt_dist.data.sampler import TaskBalancedBatchSampler
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.distributed import WorldInfo, world_info_from_env
from softcpt_dist.model import method_class
from softcpt_dist.step_phases import NULL_TIMER
from softcpt_dist.training.checkpoint import TrainingCheckpoints
from softcpt_dist.training.engine import TrainEngine, check_repeated_steps, memory_report, micro_batch_size
from softcpt_dist.training.loop import LoopState, TrainLoop
from softcpt_dist.training.signals import StopSignals

logger = logging.getLogger(__name__)


@dataclass
class ScopeJob:
    """What one scope trains and where it reports: its classifier (``PromptClassifier``) over ``group``,
    its training samples (with their cached image features, ``[N, D]`` or ``[N, V, D]``, when the image
    encoder is skipped), per-task loss weights, the run folder and its training checkpoints."""

    model: torch.nn.Module
    group: TaskGroup
    samples: List[Sample]
    transform: Optional[Callable]
    features: Optional[torch.Tensor] = None
    task_weights: Optional[torch.Tensor] = None
    scope: str = "joint"
    run: Optional[object] = None  # RunDir
    checkpoints: Optional[TrainingCheckpoints] = None


def train_prompts(job: ScopeJob, cfg: Config, signals: Optional[StopSignals] = None,
                  world: Optional[WorldInfo] = None) -> Tuple[List[Dict], TrainEngine]:
    """Train ``job.model.method`` on this rank's shards; returns the per-epoch records and the engine.

    ``cfg``'s ``optim``, ``train``, ``engine`` and ``data`` sections apply. ``signals``: the run's
    stop-signal catcher (one is installed for the call if None). ``world``: the launch's world
    information (read from the environment if None).
    """
    if signals is None:
        with StopSignals(cfg.train.stop_signals) as own:
            return run_prepared(prepare_training(job, cfg, own, world), job, cfg)
    return run_prepared(prepare_training(job, cfg, signals, world), job, cfg)


def run_prepared(prepared: "PreparedTraining", job: ScopeJob, cfg: Config) -> Tuple[List[Dict], TrainEngine]:
    """Run a prepared training to its end, first resuming from ``job``'s checkpoints under ``train.resume``."""
    tengine, tag, train, engine = prepared.engine, prepared.loop.tag, cfg.train, cfg.engine
    if job.checkpoints is not None and train.resume:
        saved = job.checkpoints.resume(tengine, prepared.sampler, train.resume)
        if saved is not None:
            prepared.state = LoopState.from_checkpoint(saved, D.rank())
        if job.run is not None:  # what the killed run logged after its checkpoint is done again: drop it
            job.run.cut_metrics(job.scope, prepared.state.step)
    mem = memory_report(tengine.module)
    logger.info("%straining %s learnable parameters on %d %s of %d tasks: %d rank(s) x micro-batch %d x %d "
                "accumulation = global batch %d, %d iterations/epoch (sampler %s%s), %d epochs, ZeRO stage %d; "
                "rank 0 holds %.1f MiB frozen + %.2f MiB learnable parameters", tag, f"{tengine.num_learnable():,}",
                len(job.samples), "cached feature rows" if job.features is not None else "images", len(job.group),
                D.world_size(), prepared.micro_batch, engine.grad_accum_steps,
                prepared.micro_batch * engine.grad_accum_steps * D.world_size(),
                prepared.loop.steps_per_epoch // engine.grad_accum_steps, cfg.data.sampler.mode,
                f", <= {cfg.data.sampler.tasks_per_batch} tasks/batch" if prepared.sampler.tasks_per_batch else "",
                cfg.optim.epochs, engine.zero_stage, mem["frozen_param_bytes"] / 2**20,
                mem["learnable_param_bytes"] / 2**20)
    tengine.train()
    history = prepared.loop.run(prepared.state)
    tengine.synchronize()
    _report_memory(tengine, tag, job.scope, job.run, engine.zero_stage)
    tengine.train(False)
    return history, tengine


@dataclass
class PreparedTraining:
    """What a scope's training runs on: the engine, the loader and its sampler, the loop and its state."""

    engine: TrainEngine
    loader: object
    sampler: TaskBalancedBatchSampler
    loop: TrainLoop
    state: LoopState
    micro_batch: int

    def describe(self) -> Dict:
        """What was built, as plain values: two builds of one config describe themselves equally."""
        learnable = self.engine.learnable_state_dict()
        return {"scope": self.loop.scope, "classes": self.loop.group.num_classes, "micro_batch": self.micro_batch,
                "steps_per_epoch": self.loop.steps_per_epoch, "epochs": self.loop.epochs,
                "sampler_steps": len(self.sampler), "tasks_per_batch": self.sampler.tasks_per_batch,
                "learnable": {k: float(v.double().sum()) for k, v in sorted(learnable.items())},
                "engine": self.engine.describe()}


def prepare_training(job: ScopeJob, cfg: Config, signals: StopSignals, world: Optional[WorldInfo] = None,
                     timer=NULL_TIMER) -> PreparedTraining:
    """This rank's loader, the engine and the loop of ``job``, ready to run from the start (``train_prompts``
    resumes and runs them; ``softcpt-dist profile`` times their steps with ``timer``)."""
    optim, engine, data = cfg.optim, cfg.engine, cfg.data
    micro = micro_batch_size(optim, engine, D.world_size())
    loader, sampler = make_train_loader(job.samples, job.transform, micro, seed=cfg.train.seed, sampler=data.sampler,
                                        num_workers=data.num_workers, features=job.features, rank=D.rank(),
                                        world_size=D.world_size())
    tengine = TrainEngine(job.model, optim, engine, world or world_info_from_env(), micro,
                          amp=cfg.model.precision == "official_amp",
                          fixed_classes=sampler.tasks_per_batch == 0 and cfg.method.class_sample_rate == 0)
    steps_per_epoch = _whole_steps(sampler, engine.grad_accum_steps, "" if job.scope == "joint" else f"{job.scope}: ")
    loop = TrainLoop(tengine, loader, job, cfg, signals, steps_per_epoch, timer)
    return PreparedTraining(tengine, loader, sampler, loop, LoopState(), micro)


def _whole_steps(sampler, gas: int, tag: str) -> int:
    """Micro-batches per epoch that make whole optimizer steps; none is an error."""
    steps = sampler.steps_per_epoch - sampler.steps_per_epoch % gas
    if steps == 0:
        raise ConfigError(f"{tag}an epoch has {sampler.steps_per_epoch} micro-batches per rank, fewer than "
                          f"engine.grad_accum_steps={gas}")
    return steps


def check_training_setup(scopes: Dict[str, List[Sample]], cfg: Config, world_size: int, official_steps: int) -> None:
    """Refuse, before a run folder is touched, every engine and batch setting the training would refuse:
    ``scopes`` maps each scope to its training samples."""
    engine, sampling = cfg.engine, cfg.data.sampler
    micro = micro_batch_size(cfg.optim, engine, world_size)
    check_repeated_steps(official_steps, engine)
    method_class(cfg.method).check_engine(cfg.method, engine)
    for scope, samples in scopes.items():
        sampler = TaskBalancedBatchSampler([s.task for s in samples], micro, seed=cfg.train.seed, mode=sampling.mode,
                                           temperature=sampling.temperature,
                                           tasks_per_batch=sampling.tasks_per_batch, world_size=world_size)
        _whole_steps(sampler, engine.grad_accum_steps, "" if scope == "joint" else f"{scope}: ")


def _report_memory(engine: TrainEngine, tag: str, scope: str, run, zero_stage: int) -> None:
    """Every rank's parameter bytes and peak memory: logged, and written to ``memory_<scope>.json``."""
    per_rank = D.all_gather_objects(memory_report(engine.module))
    for r, mem in enumerate(per_rank):
        logger.info("%smemory rank %d: frozen params %.1f MiB, learnable params %.2f MiB, peak %.1f MiB", tag, r,
                    mem["frozen_param_bytes"] / 2**20, mem["learnable_param_bytes"] / 2**20,
                    mem.get("peak_allocated_bytes", mem.get("peak_rss_bytes", 0)) / 2**20)
    if run is not None:
        run.write_json(f"memory_{scope}.json", {"zero_stage": zero_stage, "ranks": per_rank})
