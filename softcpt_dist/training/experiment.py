"""One experiment end to end: build the run (``Trainer``), train (or fit, or neither), evaluate, report.

``run_train`` is what ``softcpt-dist train`` runs; ``run_eval`` re-evaluates a finished run from
its folder (config + prompt checkpoint), e.g. on another split or with other weights paths. What a
method needs is asked of its class (``softcpt_dist.model.methods.Method``), never of its name.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from softcpt_dist import distributed as D
from softcpt_dist.config import Config, ConfigError
from softcpt_dist.metrics import markdown_table, merge_task_results
from softcpt_dist.kernels._triton import describe as describe_kernels
from softcpt_dist.model.methods.zeroshot import ZeroShotCLIP
from softcpt_dist.model import PromptClassifier, method_class, method_label
from softcpt_dist.training.checkpoint import (CHECKPOINT_NAME, CheckpointError, checkpoint_meta, load_learnable,
                                              load_prompt_checkpoint, save_prompt_checkpoint)
from softcpt_dist.training.evaluate import evaluate
from softcpt_dist.training.inputs import Inputs
from softcpt_dist.training.run_dir import LogBuffer, RunDir
from softcpt_dist.training.scopes import Scope, scopes
from softcpt_dist.training.signals import Preempted, StopSignals
from softcpt_dist.training.trainer import Trainer, config_with_method, refuse_mixed_resume

logger = logging.getLogger(__name__)
FEWSHOT_RECORD = "fewshot_split.json"  # the exact few-shot subsets, for audit
ZEROSHOT_KEY = "zero_shot"  # results.json: zero-shot CLIP's scores beside the run's (train.compare_zeroshot)
NEW_KEY = "new"  # results.json: a base run's scores on the new classes / tasks


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


def _zeroshot(trainer: Trainer) -> Dict:
    """Zero-shot CLIP (each task's template) scored on the run's evaluation split, as a baseline."""
    zs = trainer.with_method(ZeroShotCLIP.name)
    inputs = trainer.inputs((zs.train.eval_split,))
    return _evaluate_scope(zs, scopes(zs.train, zs.method, trainer.data.group)[0],
                           trainer.classifier(trainer.data.group, zs), inputs)


def _evaluate_scope(cfg: Config, scope: Scope, model: PromptClassifier, inputs: Inputs) -> Dict:
    split = cfg.train.eval_split
    return evaluate(model, inputs.loader(split, scope), scope.group, cfg.train.progress,
                    split if scope.key == "joint" else f"{split} {scope.key}")


def run_train(cfg: Config, run_path: Optional[Path] = None) -> RunResult:
    """Train (or fit) and evaluate; the run folder is touched only once config, weights and data are checked."""
    method = method_class(cfg.method, cfg.prompt)
    early_log, run = LogBuffer(), None
    try:
        trainer = Trainer(cfg, run_path, name_folder=True)
        ctx, data = trainer.ctx, trainer.data
        if method.trains_prompts:
            trainer.check_training()
            refuse_mixed_resume(trainer)
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
        cost = {"learnable_params": 0, "train_seconds": 0.0}
        if method.fits:
            used = (*method.splits, split)
            inputs = trainer.inputs(used)
            # Every rank fits on all features (deterministic; no collectives needed).
            start = time.perf_counter()
            results, extra = method.fit(trainer.backbone, group, {s: inputs.loader(s, shard=False) for s in used},
                                        cfg.method, split)
            cost = {"learnable_params": int(extra.pop("learnable_params", 0)),
                    "train_seconds": time.perf_counter() - start}
        elif not method.trains_prompts:
            model = trainer.classifier(group)
            results = _evaluate_scope(cfg, trainer.scopes[0], model, trainer.inputs((split,)))
        else:
            # A stop signal during training (train.stop_signals): stop at the next step boundary, save, exit 75.
            with StopSignals(cfg.train.stop_signals) as signals:
                results, history, learnable = _train_and_evaluate(trainer, run, signals, record)
            cost = {"learnable_params": learnable,  # every scope's, as the paper's tables count them
                    "train_seconds": sum(r["seconds"] for r in history if r["kind"] == "epoch" and "seconds" in r)}
        if cfg.train.compare_zeroshot and (method.trains_prompts or method.fits):  # zero-shot itself: no
            extra[ZEROSHOT_KEY] = _zeroshot(trainer)
        new = _score_new_half(cfg, run.path)
        if new is not None:
            extra[NEW_KEY] = new
        _write_results(run, cfg, results, {**cost, **extra})
        log_results(results, split, extra.get(ZEROSHOT_KEY), method_label(cfg.method))
        return RunResult(run.path, results, history)
    finally:
        early_log.close()
        if run is not None:
            run.close()


def new_half(cfg: Config) -> Optional[Config]:
    """The config that scores a base run on the new half (``data.subsample_* = base`` -> ``new``), or None."""
    if "base" not in (cfg.data.subsample_classes, cfg.data.subsample_tasks):
        return None
    new = copy.deepcopy(cfg)
    for what in ("classes", "tasks"):
        if getattr(new.data, f"subsample_{what}") == "base":
            setattr(new.data, f"subsample_{what}", "new")
    return new


def _score_new_half(cfg: Config, run_path: Path) -> Optional[Dict]:
    """A run on base classes (tasks) is also scored on the new ones, with the prompts it trained rebuilt
    from the new names (base-to-new, unseen tasks): results.json's ``new`` entry."""
    new, method = new_half(cfg), method_class(cfg.method)
    if new is None:
        return None
    halves = [what for what in ("classes", "tasks") if getattr(cfg.data, f"subsample_{what}") == "base"]
    if method.fits or not all(method.transfers(cfg.method, what) for what in halves):
        logger.warning("%s cannot score %s it was not trained on: not evaluated on the new half",
                       method_label(cfg.method), " or ".join(halves))
        return None
    logger.info("scoring the new %s (%s)", " and ".join(halves), ", ".join(
        f"data.subsample_{what}=new" for what in halves))
    checkpoint = run_path / CHECKPOINT_NAME if method.trains_prompts else None
    scores = {"subsample": {"classes": new.data.subsample_classes, "tasks": new.data.subsample_tasks},
              **run_eval(new, checkpoint)}
    if cfg.train.compare_zeroshot and method.trains_prompts:
        zs = run_eval(config_with_method(new, ZeroShotCLIP.name), None)
        scores[ZEROSHOT_KEY] = {"tasks": zs["tasks"], "mean": zs["mean"]}
    return scores


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


def _train_and_evaluate(trainer: Trainer, run: RunDir, signals: StopSignals, record: "_RunRecord"):
    cfg, data = trainer.cfg, trainer.data
    inputs = trainer.inputs(("train", cfg.train.eval_split), augment_train=True)
    if D.any_rank(signals.received is not None):  # e.g. during a long feature-cache build
        raise Preempted("stop signal received before training started (cached features are kept)")
    parts, states, history = [], {}, []
    run_scopes = trainer.scopes
    if cfg.train.task_weights and len(run_scopes) > 1:
        logger.warning("train.task_weights has no effect when each task trains on its own")
    if cfg.train.resume not in (None, "latest") and len(run_scopes) > 1:
        raise ConfigError("train.resume=<folder> names one scope's checkpoint; per-task training "
                          f"({len(run_scopes)} scopes) resumes with train.resume=latest")
    for i, scope in enumerate(run_scopes):
        scope_history, engine = trainer.train(trainer.job(scope, inputs, run, on_resumed=record), signals)
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
                                                                           data.group, cfg.data), states)
    D.barrier()
    learnable = sum(t.numel() for state in states.values() for t in state.values())
    return merge_task_results(parts, data.group), history, learnable


def run_eval(cfg: Config, checkpoint: Optional[Path], out_dir: Optional[Path] = None) -> Dict:
    """Evaluate a trained prompt checkpoint (or zero-shot CLIP) on ``cfg.train.eval_split``."""
    method, label = method_class(cfg.method, cfg.prompt), method_label(cfg.method)
    if method.fits:
        raise ConfigError(f"eval: method {label} keeps no checkpoint; rerun `train` with method.name={cfg.method.name}")
    if method.trains_prompts and checkpoint is None:
        raise ConfigError(f"eval: method {label} needs a prompt checkpoint (--run or --checkpoint)")
    trainer = Trainer(cfg, out_dir)
    split, name = cfg.train.eval_split, f"eval_{cfg.train.eval_split}" + _subsample_suffix(cfg.data)
    states = None
    if method.trains_prompts:
        transferable = [to for to in ("classes", "tasks") if method.transfers(cfg.method, to)]
        states = load_prompt_checkpoint(checkpoint, checkpoint_meta(cfg.model, cfg.method, cfg.prompt,
                                                                    trainer.data.group, cfg.data), transferable)
    # Eval logs join the run's log (rank 0 writes).
    run = RunDir(out_dir, is_main=trainer.ctx.world.is_main) if out_dir is not None else None
    if run is not None:
        run.open(fresh=False, lock=False)
    try:
        results = _evaluate_checkpoint(trainer, states, checkpoint)
        halves = _subsample_suffix(cfg.data, " ").replace("_", " ")
        log_results(results, f"{split} ({halves.strip()})" if halves else split)
        if run is not None:
            run.write_json(f"{name}.json", {"method": label, "arch": cfg.model.arch, "split": split, **results})
            run.write_text(f"{name}.md", markdown_table(results, f"{label} ({split}{_subsample_suffix(cfg.data, ', ')})"))
    finally:
        if run is not None:
            run.close()
    return results


def _subsample_suffix(data, sep: str = "_") -> str:
    """``_new_classes`` / ``_new_tasks`` (both: ``_new_tasks_new_classes``) for the halves of
    ``data.subsample_*`` an evaluation scores; empty otherwise."""
    parts = [f"{half}_{what}" for what, half in (("tasks", data.subsample_tasks), ("classes", data.subsample_classes))
             if half != "all"]
    return sep + "_".join(parts) if parts else ""


def _evaluate_checkpoint(trainer: Trainer, states: Optional[Dict], checkpoint: Optional[Path]) -> Dict:
    cfg, parts = trainer.cfg, []
    inputs = trainer.inputs((cfg.train.eval_split,))
    for scope in trainer.scopes:
        model = trainer.scope_classifier(scope)
        if states is not None:
            if scope.key not in states:
                raise CheckpointError(f"checkpoint {checkpoint} has no prompts for {scope.key!r} "
                                      f"(it holds {sorted(states)}); was train.mode different?")
            load_learnable(model.method, states[scope.key], f"{checkpoint} [{scope.key}]")
        parts.append(_evaluate_scope(cfg, scope, model, inputs))
    return merge_task_results(parts, trainer.data.group)
