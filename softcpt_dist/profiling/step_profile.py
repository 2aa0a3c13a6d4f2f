"""``softcpt-dist profile``: warm-up steps, then timed steps of the real training path, and what they cost.

The run is built by the ``Trainer`` that ``train`` uses, and the steps are the training loop's own
(``TrainLoop.step`` on the DeepSpeed engine, the run's loader, feature cache, sampler, kernels and
class sharding); the profiler attaches its phase timer to them. Only the first scope (all tasks, or the first
task where each trains alone) is profiled, and nothing is checkpointed. Each step's time is split
into image side (loader wait: image decode or cache read, plus the image encoder), text forward,
loss, backward, optimizer and communication (every collective, wherever it runs); ``other`` is the
rest (targets, the loop's bookkeeping). FLOPs: ``flops.py``. Results: ``profile.json`` and
``profile.md`` in the profile folder, with ``trace_rank<r>.json`` (Chrome trace) under ``--trace``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from softcpt_dist import distributed as D
from softcpt_dist.config import Config, ConfigError
from softcpt_dist.model import method_class, method_label
from softcpt_dist.profiling import environment, summary
from softcpt_dist.profiling.flops import (LinearCounter, StepFlops, TextShape, TextWork, head_flops,
                                          image_flops_per_sample, text_flops)
from softcpt_dist.step_phases import NULL_TIMER, PhaseTimer, timed_collectives
from softcpt_dist.scaling import Link
from softcpt_dist.training.engine import engine_collective_slots, memory_report
from softcpt_dist.training.loop import LoopState, batch_classes
from softcpt_dist.training.run_dir import LogBuffer, RunDir
from softcpt_dist.training.signals import StopSignals
from softcpt_dist.training.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class ProfileSettings:
    warmup: int = 5  # steps run before timing (compilation, caches, allocator)
    steps: int = 20  # timed steps
    peak_tflops: Optional[float] = None  # per device; default: the device table (flops.PEAK_TFLOPS)
    trace: bool = False  # torch.profiler Chrome trace of the timed steps, one file per rank
    out: Optional[Path] = None  # the profile folder; default <train.output_dir>/profile-<...>-<time>
    link: Optional[Link] = None  # the cost model's interconnect; default by device (summary.default_link)


def default_folder(cfg: Config, world_size: int) -> Path:
    name = f"profile-{cfg.model.arch}-{cfg.data.dataset}-{method_label(cfg.method)}-{world_size}ranks"
    return Path(cfg.train.output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_profile(cfg: Config, settings: ProfileSettings) -> Dict:
    """Profile ``cfg``'s training steps on this launch's ranks; returns the profile record (rank 0's is whole)."""
    if not method_class(cfg.method, cfg.prompt).trains_prompts:
        raise ConfigError(f"profile: method {method_label(cfg.method)} trains no prompts (profile times training "
                          "steps: softcpt or coop)")
    if settings.steps < 1 or settings.warmup < 0:
        raise ConfigError(f"profile: --steps must be >= 1 and --warmup >= 0 (got {settings.steps}, {settings.warmup})")
    early_log, run = LogBuffer(), None
    try:
        trainer = Trainer(cfg)
        ctx = trainer.ctx
        path = Path(D.broadcast_object(str(settings.out or default_folder(cfg, ctx.world.world_size))))
        scope = trainer.scopes[0]
        job = trainer.job(scope, trainer.inputs(("train",), augment_train=True))
        features = job.features
        run = RunDir(path, is_main=ctx.world.is_main)
        run.open(fresh=True, replay=early_log)
        run.save_config(ctx.saved_config(cfg))
        timer = PhaseTimer(torch.device(ctx.device))
        with StopSignals(cfg.train.stop_signals) as signals:
            prepared = trainer.prepare(job, signals, timer)
            logger.info("profiling %s: %d warm-up + %d timed steps on %d rank(s), micro-batch %d, %d classes%s",
                        scope.key, settings.warmup, settings.steps, D.world_size(), prepared.micro_batch,
                        scope.group.num_classes, ", cached image features" if features is not None else "")
            mine = _time_steps(prepared, scope.group, timer, settings, path)
        prepared.engine.close()
        ranks = D.all_gather_objects(mine)
        record = summary.summarize(cfg, ranks, settings, environment.describe(ctx.device),
                                   prepared.engine.module.method, features is not None, prepared.micro_batch)
        if run.is_main:
            run.write_json("profile.json", record)
            run.write_text("profile.md", summary.markdown(record))
        logger.info("profile written to %s: step %.2f ms median, %.1f samples/s%s", path,
                    record["step_ms"]["median"], record["samples_per_s"],
                    f", MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else "")
        return record
    finally:
        early_log.close()
        if run is not None:
            run.close()


def _batches(prepared):
    """The training loader's micro-batches, epoch after epoch (as the loop reads them)."""
    epoch = 0
    while True:
        prepared.loop.begin_epoch(epoch)
        for n, batch in enumerate(prepared.loader, start=1):
            yield batch
            if n == prepared.loop.steps_per_epoch:
                break
        epoch += 1


def _trace(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, record_shapes=True)


def _time_steps(prepared, group, timer: PhaseTimer, settings: ProfileSettings, path: Path) -> Dict:
    """This rank's timed steps: phase times, FLOPs and text work per step, peak memory."""
    engine, loop = prepared.engine, prepared.loop
    module = engine.module
    module.timer = timer
    encoder, device = module.backbone.text_encoder, module.backbone.device
    shape, linears = TextShape.of(encoder), LinearCounter(module.method)
    loop.state, totals = LoopState(), torch.zeros(3, dtype=torch.float64)
    batches, image_per_sample, steps, tracer = _batches(prepared), None, [], None
    engine.train()
    try:
        with timed_collectives(timer, engine_collective_slots()):
            for i in range(settings.warmup + settings.steps):
                if i == settings.warmup:
                    timer.steps.clear()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    tracer = _trace(settings.trace, device)
                    tracer.__enter__()
                work, linear, sent = TextWork.of(encoder), linears.total(), loop.counters()
                module.measure_activations = i == settings.warmup + settings.steps - 1  # the last step's
                timer.begin_step()
                with timer("image"):
                    inputs, tasks, labels, _ = next(batches)
                loop.step(inputs, tasks, labels, totals, 0, engine.schedule.lr)
                phases = timer.end_step()
                if image_per_sample is None:
                    image_per_sample = image_flops_per_sample(module.backbone, inputs) if inputs.dim() == 4 else 0
                if i >= settings.warmup:
                    steps.append(_step_record(phases, shape, TextWork.of(encoder) - work, linears.total(), linear,
                                              inputs.shape[0], _classes(loop, group, tasks), module.backbone.embed_dim,
                                              image_per_sample))
                    now = loop.counters()
                    steps[-1]["bytes"] = {k: now[k] - sent[k] for k in now if k.endswith("_bytes")}
    finally:
        linears.close()
        module.timer = NULL_TIMER
        if tracer is not None:
            tracer.__exit__(None, None, None)
    if settings.trace:
        tracer.export_chrome_trace(str(path / f"trace_rank{D.rank()}.json"))
    module.measure_activations = False
    return {"rank": D.rank(), "steps": steps,
            "memory": {**memory_report(module), "text_activation_bytes": float(module.activation_bytes)}}


def _classes(loop, group, tasks: torch.Tensor) -> int:
    return len(batch_classes(group, tasks)) if loop.grouped else group.num_classes


def _step_record(phases: Dict[str, float], shape: TextShape, work: TextWork, linear_now: Dict[str, int],
                 linear_before: Dict[str, int], batch: int, classes: int, dim: int, image_per_sample: int) -> Dict:
    flops = StepFlops({"text": text_flops(shape, work),
                       "meta_net": {k: linear_now[k] - linear_before[k] for k in linear_now},
                       "head": head_flops(batch, classes, dim),
                       "image": {"forward": image_per_sample * batch, "backward": 0}})
    return {"phases": phases, "flops": flops.parts, "flops_total": flops.total, "positions": work.positions,
            "pairs": work.pairs, "features": work.features, "batch": batch, "classes": classes}

