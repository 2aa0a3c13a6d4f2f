"""Training one scope's prompts: loader and engine, resume from a checkpoint, the loop, memory report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from softcpt_dist import distributed as D
from softcpt_dist.config import ConfigError, DataConfig, EngineConfig, OptimConfig, TrainConfig
from softcpt_dist.data.dataset import Sample
from softcpt_dist.data.loaders import make_train_loader
from softcpt_dist.data.sampler import TaskBalancedBatchSampler
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.distributed import WorldInfo, world_info_from_env
from softcpt_dist.step_phases import NULL_TIMER
from softcpt_dist.training.checkpoint import TrainingCheckpoints
from softcpt_dist.training.engine import TrainEngine, check_repeated_steps, memory_report, micro_batch_size
from softcpt_dist.training.loop import LoopState, TrainLoop
from softcpt_dist.training.signals import StopSignals

logger = logging.getLogger(__name__)


def train_prompts(model, group: TaskGroup, samples: List[Sample], transform, *, optim: OptimConfig,
                  train: TrainConfig, engine: EngineConfig, data: DataConfig, world: Optional[WorldInfo] = None,
                  run=None, task_weights: Optional[torch.Tensor] = None, scope: str = "joint",
                  features: Optional[torch.Tensor] = None, checkpoints: Optional[TrainingCheckpoints] = None,
                  signals: Optional[StopSignals] = None) -> Tuple[List[Dict], TrainEngine]:
    """Train ``model.method`` on this rank's shards; returns the per-epoch records and the engine.

    ``features``: cached image features of ``samples`` (``[N, D]`` or ``[N, V, D]``); the image
    encoder is then skipped. ``signals``: the run's stop-signal catcher (one is installed here if
    None). ``world``: the launch's world information (read from the environment if None).
    """
    if signals is None:
        with StopSignals(train.stop_signals) as own:
            return train_prompts(model, group, samples, transform, optim=optim, train=train, engine=engine,
                                 data=data, world=world, run=run, task_weights=task_weights, scope=scope,
                                 features=features, checkpoints=checkpoints, signals=own)
    prepared = prepare_training(model, group, samples, transform, optim=optim, train=train, engine=engine, data=data,
                                world=world, run=run, task_weights=task_weights, scope=scope, features=features,
                                checkpoints=checkpoints, signals=signals)
    tengine, tag = prepared.engine, prepared.loop.tag
    if checkpoints is not None and train.resume:
        saved = checkpoints.resume(tengine, prepared.sampler, train.resume)
        if saved is not None:
            prepared.state = LoopState.from_checkpoint(saved, D.rank())
        if run is not None:  # what the killed run logged after its checkpoint is done again: drop it
            run.cut_metrics(scope, prepared.state.step)
    mem = memory_report(tengine.module)
    logger.info("%straining %s learnable parameters on %d %s of %d tasks: %d rank(s) x micro-batch %d x %d "
                "accumulation = global batch %d, %d iterations/epoch (sampler %s%s), %d epochs, ZeRO stage %d; "
                "rank 0 holds %.1f MiB frozen + %.2f MiB learnable parameters", tag, f"{tengine.num_learnable():,}",
                len(samples), "cached feature rows" if features is not None else "images", len(group),
                D.world_size(), prepared.micro_batch, engine.grad_accum_steps,
                prepared.micro_batch * engine.grad_accum_steps * D.world_size(),
                prepared.loop.steps_per_epoch // engine.grad_accum_steps, data.sampler.mode,
                f", <= {data.sampler.tasks_per_batch} tasks/batch" if prepared.sampler.tasks_per_batch else "",
                optim.epochs, engine.zero_stage, mem["frozen_param_bytes"] / 2**20,
                mem["learnable_param_bytes"] / 2**20)
    tengine.train()
    history = prepared.loop.run(prepared.state)
    _report_memory(tengine, tag, scope, run, engine.zero_stage)
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


def prepare_training(model, group: TaskGroup, samples: List[Sample], transform, *, optim: OptimConfig,
                     train: TrainConfig, engine: EngineConfig, data: DataConfig, world: Optional[WorldInfo],
                     run, task_weights: Optional[torch.Tensor], scope: str, features: Optional[torch.Tensor],
                     checkpoints: Optional[TrainingCheckpoints], signals: StopSignals,
                     timer=NULL_TIMER) -> PreparedTraining:
    """This rank's loader, the engine and the loop, ready to run from the start (``train_prompts`` resumes
    and runs them; ``softcpt-dist profile`` times their steps with ``timer``)."""
    micro = micro_batch_size(optim, engine, D.world_size())
    loader, sampler = make_train_loader(samples, transform, micro, seed=train.seed, sampler=data.sampler,
                                        num_workers=data.num_workers, features=features, rank=D.rank(),
                                        world_size=D.world_size())
    tengine = TrainEngine(model, optim, engine, world or world_info_from_env(), micro)
    steps_per_epoch = _whole_steps(sampler, engine.grad_accum_steps, "" if scope == "joint" else f"{scope}: ")
    loop = TrainLoop(tengine, loader, sampler, group, train, epochs=optim.epochs, steps_per_epoch=steps_per_epoch,
                     grad_accum_steps=engine.grad_accum_steps, signals=signals, run=run, task_weights=task_weights,
                     scope=scope, checkpoints=checkpoints, timer=timer)
    return PreparedTraining(tengine, loader, sampler, loop, LoopState(), micro)


def _whole_steps(sampler, gas: int, tag: str) -> int:
    """Micro-batches per epoch that make whole optimizer steps; none is an error."""
    steps = sampler.steps_per_epoch - sampler.steps_per_epoch % gas
    if steps == 0:
        raise ConfigError(f"{tag}an epoch has {sampler.steps_per_epoch} micro-batches per rank, fewer than "
                          f"engine.grad_accum_steps={gas}")
    return steps


def check_training_setup(scopes: Dict[str, List[Sample]], optim: OptimConfig, engine: EngineConfig,
                         data: DataConfig, train: TrainConfig, world_size: int, official_steps: int) -> None:
    """Refuse, before a run folder is touched, every engine and batch setting the training would refuse:
    ``scopes`` maps each scope to its training samples."""
    micro = micro_batch_size(optim, engine, world_size)
    check_repeated_steps(official_steps, engine)
    for scope, samples in scopes.items():
        sampler = TaskBalancedBatchSampler([s.task for s in samples], micro, seed=train.seed, mode=data.sampler.mode,
                                           temperature=data.sampler.temperature,
                                           tasks_per_batch=data.sampler.tasks_per_batch, world_size=world_size)
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
