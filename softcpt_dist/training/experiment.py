"""One experiment end to end: build backbone and data, train (or fit, or neither), evaluate, report.

``run_train`` is what ``softcpt-dist train`` runs; ``run_eval`` re-evaluates a finished run from
its folder (config + prompt checkpoint), e.g. on another split or with other weights paths. What a
method needs is asked of its class (``softcpt_dist.model.methods.Method``), never of its name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

from softcpt_dist import distributed as D
from softcpt_dist.config import Config, ConfigError, DataConfig, TrainConfig
from softcpt_dist.data.dataset import MultiTaskData
from softcpt_dist.data.loading import ensure_builtin_data, load_data
from softcpt_dist.data.transforms import train_transform
from softcpt_dist.metrics import markdown_table, merge_task_results
from softcpt_dist.kernels._triton import describe as describe_kernels
from softcpt_dist.model.methods.zeroshot import ZeroShotCLIP
from softcpt_dist.model import PromptClassifier, build_backbone, build_method, method_class, method_label
from softcpt_dist.seeding import seed_everything
from softcpt_dist.training.checkpoint import (CHECKPOINT_NAME, CheckpointError, TrainingCheckpoints,
                                              checkpoint_meta, load_learnable, load_prompt_checkpoint,
                                              resume_settings, save_prompt_checkpoint)
from softcpt_dist.training.engine import partitions_its_module
from softcpt_dist.training.evaluate import evaluate
from softcpt_dist.training.inputs import Inputs, prepare_inputs
from softcpt_dist.training.resolved import ResolvedRun, start_run
from softcpt_dist.training.run_dir import LogBuffer, RunDir
from softcpt_dist.training.scopes import Scope, scopes
from softcpt_dist.training.signals import Preempted, StopSignals
from softcpt_dist.training.trainer import check_training_setup, train_prompts

logger = logging.getLogger(__name__)
FEWSHOT_RECORD = "fewshot_split.json"  # the exact few-shot subsets, for audit
ZEROSHOT_KEY = "zero_shot"  # results.json: zero-shot CLIP's scores beside the run's (train.compare_zeroshot)


@dataclass
class RunResult:
    path: Path
    results: Dict  # group metrics on the evaluation split
    history: List[Dict]  # per-epoch training records (all scopes)


def log_results(results: Dict, split: str, zeroshot: Optional[Dict] = None, label: str = "") -> None:
    """Per-task scores; with ``zeroshot`` (``train.compare_zeroshot``) zero-shot CLIP's beside them."""
    if zeroshot is None:
        logger.info("%s: mean over tasks %.2f", split, results["mean"])
        for key, r in results["tasks"].items():
            logger.info("  %-20s %-24s %6.2f", key, r["metric"], r["value"])
        return
    logger.info("%s: %-20s %-24s %14s %10s", split, "task", "metric", label, "zero-shot")
    for key, r in results["tasks"].items():
        logger.info("  %-24s %-24s %14.2f %10.2f", key, r["metric"], r["value"], zeroshot["tasks"][key]["value"])
    logger.info("  %-24s %-24s %14.2f %10.2f", "mean over tasks", "", results["mean"], zeroshot["mean"])


def _zeroshot(cfg: Config, ctx: ResolvedRun, backbone, data: MultiTaskData) -> Dict:
    """Zero-shot CLIP (each task's template) scored on the run's evaluation split, as a baseline."""
    zs = replace(cfg, method=replace(cfg.method, name=ZeroShotCLIP.name))
    inputs = prepare_inputs(backbone, data, (cfg.train.eval_split,), ctx.data, cfg.train, cfg.model.precision)
    return _evaluate_scope(zs, scopes(zs.train, zs.method, data.group)[0], build_classifier(zs, backbone, data.group),
                           inputs)


def load_data_once(dcfg: DataConfig, train: TrainConfig) -> MultiTaskData:
    """Every rank reads the data; only rank 0 generates the built-in dataset when it is missing."""
    if D.rank() == 0:
        ensure_builtin_data(dcfg)
    D.barrier()
    return load_data(dcfg, train.seed, train.eval_split)


def build_classifier(cfg: Config, backbone, group) -> PromptClassifier:
    """The run's method on ``backbone`` for ``group``, its class prompts sharded over ranks per ``text.shard``."""
    return PromptClassifier(backbone, build_method(backbone, group, cfg.method, cfg.prompt), cfg.text, cfg.kernels)


def _evaluate_scope(cfg: Config, scope: Scope, model: PromptClassifier, inputs: Inputs) -> Dict:
    split = cfg.train.eval_split
    return evaluate(model, inputs.loader(split, scope), scope.group, cfg.train.progress,
                    split if scope.key == "joint" else f"{split} {scope.key}")


def run_train(cfg: Config, run_path: Optional[Path] = None) -> RunResult:
    """Train (or fit) and evaluate; the run folder is touched only once config, weights and data are checked."""
    method = method_class(cfg.method, cfg.prompt)
    early_log, run = LogBuffer(), None
    try:
        ctx = start_run(cfg, run_path, name_folder=True)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        backbone = build_backbone(cfg.model, ctx.device, cfg.text, cfg.kernels)
        data = load_data_once(ctx.data, cfg.train)
        if method.trains_prompts:
            _check_training(cfg, ctx, data, method)
        run = RunDir(ctx.path, is_main=ctx.world.is_main)
        run.open(fresh=not cfg.train.resume, replay=early_log)
        if cfg.train.resume:
            logger.info("resuming in run folder %s (train.resume=%s)", run.path, cfg.train.resume)
        logger.info("run folder: %s (%d rank(s), launcher %s)", run.path, ctx.world.world_size, ctx.world.launcher)
        logger.info("kernels: %s", describe_kernels(cfg.kernels.enabled, ctx.device))
        record = _RunRecord(run, ctx.saved_config(cfg), data.report)
        if not (cfg.train.resume and method.trains_prompts):
            record()  # a resumed run records its settings once its checkpoint has accepted them
        group, split, extra, history = data.group, cfg.train.eval_split, {}, []
        logger.info("tasks: %s", ", ".join(f"{t.key} ({t.num_classes} classes)" for t in group.tasks))
        logger.info("splits: %s", ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()))
        if method.fits:
            used = (*method.splits, split)
            inputs = prepare_inputs(backbone, data, used, ctx.data, cfg.train, cfg.model.precision)
            # Every rank fits on all features (deterministic; no collectives needed).
            results, extra = method.fit(backbone, group, {s: inputs.loader(s, shard=False) for s in used}, cfg.method,
                                        split)
        elif not method.trains_prompts:
            model = build_classifier(cfg, backbone, group)
            inputs = prepare_inputs(backbone, data, (split,), ctx.data, cfg.train, cfg.model.precision)
            results = _evaluate_scope(cfg, scopes(cfg.train, cfg.method, group)[0], model, inputs)
        else:
            # A stop signal during training (train.stop_signals): stop at the next step boundary, save, exit 75.
            with StopSignals(cfg.train.stop_signals) as signals:
                results, history = _train_and_evaluate(cfg, ctx, backbone, data, run, signals, record)
        if cfg.train.compare_zeroshot and (method.trains_prompts or method.fits):  # zero-shot itself: no
            extra[ZEROSHOT_KEY] = _zeroshot(cfg, ctx, backbone, data)
        _write_results(run, cfg, results, extra)
        log_results(results, split, extra.get(ZEROSHOT_KEY), method_label(cfg.method))
        return RunResult(run.path, results, history)
    finally:
        early_log.close()
        if run is not None:
            run.close()


def _check_training(cfg: Config, ctx: ResolvedRun, data: MultiTaskData, method) -> None:
    """What training would refuse, refused now, before the run folder is touched."""
    run_scopes = scopes(cfg.train, cfg.method, data.group)
    steps = method.official_modules(cfg.method) if cfg.optim.official_stepping else 1
    check_training_setup({s.key: s.select(data.splits["train"])[0] for s in run_scopes}, cfg.optim, cfg.engine,
                         ctx.data, cfg.train, ctx.world.world_size, steps)
    saved = ctx.path / "checkpoints"
    other = sorted({p.name for p in saved.iterdir() if p.is_dir()} - {s.key for s in run_scopes}) \
        if cfg.train.resume and saved.is_dir() else []
    if other:
        raise ConfigError(f"train.resume: run folder {ctx.path} holds training checkpoints of {other}, not of this "
                          f"run's {[s.key for s in run_scopes]}: was method.name, method.coop_mode or train.mode "
                          "different? (resume with those, or use another train.run_name)")


class _RunRecord:
    """Writes the run's config.yaml and few-shot record, once."""

    def __init__(self, run: RunDir, cfg: Config, fewshot: Dict):
        self.run, self.cfg, self.fewshot, self.done = run, cfg, fewshot, False

    def __call__(self) -> None:
        if not self.done:
            self.run.save_config(self.cfg)
            self.run.write_json(FEWSHOT_RECORD, self.fewshot)
            self.done = True


def _write_results(run: RunDir, cfg: Config, results: Dict, extra: Dict) -> None:
    label, split = method_label(cfg.method), cfg.train.eval_split
    run.write_json("results.json", {"method": label, "arch": cfg.model.arch, "split": split,
                                    "shots": cfg.data.shots, "seed": cfg.train.seed, **extra, **results})
    shots = f"{cfg.data.shots}-shot" if cfg.data.shots else "all training images"
    run.write_text("results.md", markdown_table(results, f"{label} on {cfg.data.dataset} ({split}, {shots}, "
                                                         f"seed {cfg.train.seed})"))


def _train_and_evaluate(cfg: Config, ctx: ResolvedRun, backbone, data: MultiTaskData, run: RunDir,
                        signals: StopSignals, record: "_RunRecord"):
    train_tf = train_transform(backbone.preprocess_cfg, cfg.data.train_augment)
    inputs = prepare_inputs(backbone, data, ("train", cfg.train.eval_split), ctx.data, cfg.train, cfg.model.precision,
                            train_tf)
    if D.any_rank(signals.received is not None):  # e.g. during a long feature-cache build
        raise Preempted("stop signal received before training started (cached features are kept)")
    parts, states, history = [], {}, []
    run_scopes = scopes(cfg.train, cfg.method, data.group)
    if cfg.train.task_weights and len(run_scopes) > 1:
        logger.warning("train.task_weights has no effect when each task trains on its own")
    if cfg.train.resume not in (None, "latest") and len(run_scopes) > 1:
        raise ConfigError("train.resume=<folder> names one scope's checkpoint; per-task training "
                          f"({len(run_scopes)} scopes) resumes with train.resume=latest")
    for i, scope in enumerate(run_scopes):
        if i > 0 and partitions_its_module(cfg.engine):  # each scope's engine gets a backbone of its own
            seed_everything(cfg.train.seed, cfg.train.deterministic)
            backbone = build_backbone(cfg.model, ctx.device, cfg.text, cfg.kernels)
        seed_everything(cfg.train.seed, cfg.train.deterministic)  # each task's run independent of the others
        model = build_classifier(cfg, backbone, scope.group)
        weights = scope.group.task_weights(cfg.train.task_weights) if scope.key == "joint" else None
        samples, feats = scope.select(data.splits["train"], inputs.features.get("train"))
        checkpoints = TrainingCheckpoints(run.path / "checkpoints" / scope.key, cfg.train.keep_checkpoints,
                                          checkpoint_meta(cfg.model, cfg.method, cfg.prompt, scope.group),
                                          resume_settings(cfg.model, cfg.optim, ctx.data, cfg.train, samples),
                                          on_resumed=record)
        scope_history, engine = train_prompts(model, scope.group, samples, train_tf, optim=cfg.optim, train=cfg.train,
                                              engine=cfg.engine, data=ctx.data, world=ctx.world, run=run,
                                              task_weights=weights, scope=scope.key, features=feats,
                                              checkpoints=checkpoints, signals=signals)
        history += scope_history
        states[scope.key] = engine.learnable_state_dict()
        # Evaluate now so that per-task runs hold one model at a time.
        parts.append(_evaluate_scope(cfg, scope, engine.module, inputs))
        engine.close()
        if D.any_rank(signals.received is not None) and i + 1 < len(run_scopes):
            raise Preempted(f"stop signal received after training {scope.key!r}: its checkpoint is saved")
    record()
    if run.is_main:
        save_prompt_checkpoint(run.path / CHECKPOINT_NAME, checkpoint_meta(cfg.model, cfg.method, cfg.prompt,
                                                                           data.group), states)
    D.barrier()
    return merge_task_results(parts, data.group), history


def run_eval(cfg: Config, checkpoint: Optional[Path], out_dir: Optional[Path] = None) -> Dict:
    """Evaluate a trained prompt checkpoint (or zero-shot CLIP) on ``cfg.train.eval_split``."""
    method, label = method_class(cfg.method, cfg.prompt), method_label(cfg.method)
    if method.fits:
        raise ConfigError(f"eval: method {label} keeps no checkpoint; rerun `train` with method.name={cfg.method.name}")
    if method.trains_prompts and checkpoint is None:
        raise ConfigError(f"eval: method {label} needs a prompt checkpoint (--run or --checkpoint)")
    ctx = start_run(cfg, out_dir)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    backbone = build_backbone(cfg.model, ctx.device, cfg.text, cfg.kernels)
    data = load_data_once(ctx.data, cfg.train)
    split = cfg.train.eval_split
    states = None
    if method.trains_prompts:
        states = load_prompt_checkpoint(checkpoint, checkpoint_meta(cfg.model, cfg.method, cfg.prompt, data.group))
    # Eval logs join the run's log (rank 0 writes).
    run = RunDir(out_dir, is_main=ctx.world.is_main) if out_dir is not None else None
    if run is not None:
        run.open(fresh=False, lock=False)
    try:
        results = _evaluate_checkpoint(cfg, ctx, backbone, data, states, checkpoint)
        log_results(results, split)
        if run is not None:
            run.write_json(f"eval_{split}.json", {"method": label, "arch": cfg.model.arch, "split": split,
                                                  **results})
            run.write_text(f"eval_{split}.md", markdown_table(results, f"{label} ({split})"))
    finally:
        if run is not None:
            run.close()
    return results


def _evaluate_checkpoint(cfg: Config, ctx: ResolvedRun, backbone, data: MultiTaskData, states: Optional[Dict],
                         checkpoint: Optional[Path]) -> Dict:
    parts = []
    inputs = prepare_inputs(backbone, data, (cfg.train.eval_split,), ctx.data, cfg.train, cfg.model.precision)
    for scope in scopes(cfg.train, cfg.method, data.group):
        model = build_classifier(cfg, backbone, scope.group)
        if states is not None:
            if scope.key not in states:
                raise CheckpointError(f"checkpoint {checkpoint} has no prompts for {scope.key!r} "
                                      f"(it holds {sorted(states)}); was train.mode different?")
            load_learnable(model.method, states[scope.key], f"{checkpoint} [{scope.key}]")
        parts.append(_evaluate_scope(cfg, scope, model, inputs))
    return merge_task_results(parts, data.group)
