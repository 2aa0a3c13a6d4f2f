"""One experiment end to end: build backbone and data, train (or fit / not), evaluate, report.

``run_train`` is what ``softcpt-dist train`` runs; ``run_eval`` re-evaluates a finished run from
its folder (config + prompt checkpoint), e.g. on another split or with other weights paths.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from softcpt_dist.checkpoint import (checkpoint_meta, load_learnable, load_prompt_checkpoint,
                                     save_prompt_checkpoint)
from softcpt_dist.clip_backbone import build_backbone
from softcpt_dist.config import Config, ConfigError
from softcpt_dist.data import MultiTaskData, load_data
from softcpt_dist.data.dataset import Sample
from softcpt_dist.data.transforms import eval_transform, train_transform
from softcpt_dist.evaluate import evaluate
from softcpt_dist.methods import build_prompt_method, method_label
from softcpt_dist.methods.linear_probe import run_linear_probe
from softcpt_dist.metrics import markdown_table, merge_task_results
from softcpt_dist.model import PromptClassifier
from softcpt_dist.run_dir import RunDir
from softcpt_dist.train import make_loader, seed_everything, train_prompts

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "prompt_checkpoint.pt"


@dataclass
class RunResult:
    path: Path
    results: Dict  # group metrics on the evaluation split
    history: List[Dict]  # per-epoch training records (all scopes)


def training_mode(cfg: Config) -> str:
    if cfg.train.mode != "auto":
        return cfg.train.mode
    return "per_task" if cfg.method.name == "coop" and cfg.method.coop_mode in ("CA", "CS") else "joint"


def _single_task(samples: List[Sample], task: int) -> List[Sample]:
    return [Sample(s.path, 0, s.label) for s in samples if s.task == task]


def _eval_loader(cfg: Config, samples, preprocess_cfg):
    return make_loader(samples, eval_transform(preprocess_cfg), cfg.train.eval_batch_size, shuffle=False,
                       seed=cfg.train.seed, num_workers=cfg.data.num_workers)


def _default_run_name(cfg: Config) -> str:
    shots = f"{cfg.data.shots}shot" if cfg.data.shots else "full"
    return f"{method_label(cfg)}-{cfg.data.dataset}-{shots}-seed{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_train(cfg: Config, run_path: Optional[Path] = None) -> RunResult:
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    run = RunDir(cfg, cfg.train.run_name or _default_run_name(cfg), path=run_path)
    try:
        run.save_config(cfg)
        logger.info("run folder: %s", run.path)
        backbone = build_backbone(cfg.model)
        data = load_data(cfg.data, cfg.train.seed)
        group = data.group
        logger.info("tasks: %s", ", ".join(f"{t.key} ({t.num_classes} classes)" for t in group.tasks))
        logger.info("splits: %s", ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()))
        split = cfg.train.eval_split
        label = method_label(cfg)
        history: List[Dict] = []
        extra: Dict = {}
        if cfg.method.name == "linear_probe":
            loaders = {s: _eval_loader(cfg, data.splits[s], backbone.preprocess_cfg)
                       for s in ("train", "val", split)}
            results, extra["chosen_C"] = run_linear_probe(backbone, group, loaders, cfg.method.lp_c_grid,
                                                          cfg.method.lp_search_steps, cfg.method.lp_max_iter, split)
        elif cfg.method.name == "zeroshot":
            model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, group))
            results = evaluate(model, _eval_loader(cfg, data.splits[split], backbone.preprocess_cfg), group,
                               cfg.train.progress, desc=split)
        else:
            results, history = _train_and_evaluate(cfg, backbone, data, run, label)
        run.write_json("results.json", {"method": label, "arch": cfg.model.arch, "split": split,
                                        "shots": cfg.data.shots, "seed": cfg.train.seed, **extra, **results})
        shots = f"{cfg.data.shots}-shot" if cfg.data.shots else "all training images"
        run.write_text("results.md", markdown_table(results, f"{label} on {cfg.data.dataset} ({split}, {shots}, "
                                                             f"seed {cfg.train.seed})"))
        logger.info("%s mean %s: %.2f", split, "over tasks", results["mean"])
        for key, r in results["tasks"].items():
            logger.info("  %-20s %-24s %6.2f", key, r["metric"], r["value"])
        return RunResult(run.path, results, history)
    finally:
        run.close()


def _train_and_evaluate(cfg: Config, backbone, data: MultiTaskData, run: RunDir, label: str):
    group, split = data.group, cfg.train.eval_split
    pre = backbone.preprocess_cfg
    train_tf = train_transform(pre, cfg.data.train_augment)
    states, parts, history = {}, [], []
    if training_mode(cfg) == "joint":
        model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, group))
        weights = group.task_weights(cfg.train.task_weights)
        history = train_prompts(cfg, model, group, data.splits["train"], train_tf, run, weights)
        states["joint"] = model.learnable_state_dict()
        results = evaluate(model, _eval_loader(cfg, data.splits[split], pre), group, cfg.train.progress, split)
    else:
        if cfg.train.task_weights:
            logger.warning("train.task_weights has no effect when each task trains on its own")
        for i, task in enumerate(group.tasks):
            sub = group.subset([i])
            model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, sub))
            history += train_prompts(cfg, model, sub, _single_task(data.splits["train"], i), train_tf, run,
                                     tag=f"{task.key}: ")
            states[task.key] = model.learnable_state_dict()
            parts.append(evaluate(model, _eval_loader(cfg, _single_task(data.splits[split], i), pre), sub,
                                  cfg.train.progress, f"{split} {task.key}"))
        results = merge_task_results(parts, group)
    if run.is_main:
        save_prompt_checkpoint(run.path / CHECKPOINT_NAME, checkpoint_meta(cfg.model.arch, label, group), states)
    return results, history


def run_eval(cfg: Config, checkpoint: Optional[Path], out_dir: Optional[Path] = None) -> Dict:
    """Evaluate a trained prompt checkpoint (or zero-shot CLIP) on ``cfg.train.eval_split``."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    backbone = build_backbone(cfg.model)
    data = load_data(cfg.data, cfg.train.seed)
    group, split, label = data.group, cfg.train.eval_split, method_label(cfg)
    pre = backbone.preprocess_cfg
    if cfg.method.name == "linear_probe":
        raise ConfigError("eval: the linear probe keeps no checkpoint; rerun `train` with method.name=linear_probe")
    if cfg.method.name == "zeroshot":
        model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, group))
        results = evaluate(model, _eval_loader(cfg, data.splits[split], pre), group, cfg.train.progress, split)
    else:
        if checkpoint is None:
            raise ConfigError(f"eval: method {label} needs a prompt checkpoint (--run or --checkpoint)")
        states = load_prompt_checkpoint(checkpoint, checkpoint_meta(cfg.model.arch, label, group))
        if "joint" in states:
            model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, group))
            load_learnable(model.method, states["joint"], str(checkpoint))
            results = evaluate(model, _eval_loader(cfg, data.splits[split], pre), group, cfg.train.progress, split)
        else:
            parts = []
            for i, task in enumerate(group.tasks):
                sub = group.subset([i])
                model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, sub))
                load_learnable(model.method, states[task.key], f"{checkpoint} [{task.key}]")
                parts.append(evaluate(model, _eval_loader(cfg, _single_task(data.splits[split], i), pre), sub,
                                      cfg.train.progress, f"{split} {task.key}"))
            results = merge_task_results(parts, group)
    if out_dir is not None:
        run = RunDir(cfg, "", path=out_dir)
        try:
            run.write_json(f"eval_{split}.json", {"method": label, "arch": cfg.model.arch, "split": split,
                                                  **results})
            run.write_text(f"eval_{split}.md", markdown_table(results, f"{label} ({split})"))
        finally:
            run.close()
    return results
