"""One experiment end to end: build backbone and data, train (or fit / not), evaluate, report.

``run_train`` is what ``softcpt-dist train`` runs; ``run_eval`` re-evaluates a finished run from
its folder (config + prompt checkpoint), e.g. on another split or with other weights paths.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from softcpt_dist.checkpoint import (CheckpointError, checkpoint_meta, load_learnable, load_prompt_checkpoint,
                                     save_prompt_checkpoint)
from softcpt_dist.clip_backbone import build_backbone
from softcpt_dist.config import Config, ConfigError
from softcpt_dist.data import MultiTaskData, ensure_builtin_data, load_data
from softcpt_dist.data.dataset import Sample
from softcpt_dist.data.features import open_cache
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.data.transforms import eval_transform, train_transform
from softcpt_dist.evaluate import evaluate
from softcpt_dist.methods import build_prompt_method, method_label
from softcpt_dist.methods.linear_probe import run_linear_probe
from softcpt_dist.metrics import markdown_table, merge_task_results
from softcpt_dist.model import PromptClassifier
from softcpt_dist.run_dir import RunDir
from softcpt_dist import distributed as D
from softcpt_dist.train import (Preempted, StopSignals, TrainingCheckpoints, make_loader, seed_everything,
                                train_prompts)

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "prompt_checkpoint.pt"
FEWSHOT_RECORD = "fewshot_split.json"  # the exact few-shot subsets, for audit


@dataclass
class RunResult:
    path: Path
    results: Dict  # group metrics on the evaluation split
    history: List[Dict]  # per-epoch training records (all scopes)


def training_mode(cfg: Config) -> str:
    if cfg.train.mode != "auto":
        return cfg.train.mode
    return "per_task" if cfg.method.name == "coop" and cfg.method.coop_mode in ("CA", "CS") else "joint"


@dataclass
class Scope:
    """Tasks that share one prompt model: all of them (``joint``) or a single task (CoOp CA/CS)."""

    key: str
    task_indices: List[int]
    group: TaskGroup

    def indices(self, samples: List[Sample]) -> List[int]:
        """Positions of this scope's samples in ``samples``."""
        tasks = set(self.task_indices)
        return [i for i, s in enumerate(samples) if s.task in tasks]

    def select(self, samples: List[Sample], features: Optional[torch.Tensor] = None):
        """This scope's samples (task indices renumbered within the scope), and their feature rows."""
        local = {t: i for i, t in enumerate(self.task_indices)}
        idx = self.indices(samples)
        picked = [Sample(samples[i].path, local[samples[i].task], samples[i].label) for i in idx]
        return picked, (None if features is None else features[torch.as_tensor(idx, dtype=torch.long)])


def scopes(cfg: Config, group: TaskGroup) -> List[Scope]:
    if training_mode(cfg) == "joint" or cfg.method.name == "zeroshot":
        return [Scope("joint", list(range(len(group))), group)]
    return [Scope(t.key, [i], group.subset([i])) for i, t in enumerate(group.tasks)]


@dataclass
class Inputs:
    """What the model reads per split: the samples and, with the feature cache, their features."""

    data: MultiTaskData
    eval_transform: Callable
    features: Dict[str, torch.Tensor]  # split -> cached features aligned with data.splits[split]

    def loader(self, cfg: Config, split: str, scope: Optional[Scope] = None, shard: bool = True):
        """Evaluation loader; with ``shard``, this rank's samples ``rank::world`` only."""
        samples, feats = self.data.splits[split], self.features.get(split)
        if scope is not None:
            samples, feats = scope.select(samples, feats)
        r, w = D.rank(), D.world_size()
        shard = shard and 1 < w <= len(samples)  # every shard non-empty (all ranks decide alike)
        if shard:
            samples, feats = samples[r::w], (None if feats is None else feats[r::w])
        loader = make_loader(samples, self.eval_transform, cfg.train.eval_batch_size, cfg.train.seed,
                             cfg.data.num_workers, feats)
        loader.sharded = shard  # evaluate() gathers the shards' predictions
        return loader


def prepare_inputs(cfg: Config, backbone, data: MultiTaskData, splits: Sequence[str],
                   train_transform_fn: Optional[Callable] = None) -> Inputs:
    """Eval transform, and cached features of ``splits`` when ``data.cache.enabled`` (training
    images get augmented views only with ``data.cache.train_views > 0``; with
    ``data.train_augment=none`` they are plain features)."""
    eval_tf = eval_transform(backbone.preprocess_cfg)
    cache = open_cache(cfg, backbone, cfg.train.progress)
    features: Dict[str, torch.Tensor] = {}
    if cache is not None:
        for split in splits:
            if split == "train" and train_transform_fn is not None and cfg.data.train_augment != "none":
                if cfg.data.cache.train_views > 0:
                    features[split] = cache.features(data.splits[split], train_transform_fn,
                                                     cfg.data.cache.train_views, cfg.train.seed,
                                                     cfg.data.train_augment)
                continue  # no cached views: augment images on the fly
            features[split] = cache.features(data.splits[split], eval_tf)
        logger.info("feature cache %s: %s", cache.dir, ", ".join(f"{k} {tuple(v.shape)}" for k, v in features.items()))
    return Inputs(data, eval_tf, features)


def _evaluate_scope(cfg: Config, scope: Scope, model: PromptClassifier, inputs: Inputs) -> Dict:
    split = cfg.train.eval_split
    return evaluate(model, inputs.loader(cfg, split, scope), scope.group, cfg.train.progress,
                    split if scope.key == "joint" else f"{split} {scope.key}")


def _default_run_name(cfg: Config) -> str:
    shots = f"{cfg.data.shots}shot" if cfg.data.shots else "full"
    return f"{method_label(cfg)}-{cfg.data.dataset}-{shots}-seed{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def log_results(results: Dict, split: str) -> None:
    logger.info("%s: mean over tasks %.2f", split, results["mean"])
    for key, r in results["tasks"].items():
        logger.info("  %-20s %-24s %6.2f", key, r["metric"], r["value"])


def start_distributed(cfg: Config) -> D.WorldInfo:
    """Join the job's process group (a private one for a single process); non-main ranks log warnings only."""
    info = D.world_info_from_env()
    if cfg.model.device.startswith("cuda") and info.world_size > 1:
        cfg.model.device = f"cuda:{info.local_rank}"
    D.quiet_non_main_ranks(info)
    D.init_distributed(info, cfg.model.device, cfg.engine.timeout_s, cfg.engine.backend)
    return info


def _load_data_once(cfg: Config) -> MultiTaskData:
    """Every rank reads the data; only rank 0 generates the built-in dataset when it is missing."""
    if D.rank() == 0:
        ensure_builtin_data(cfg.data)
    D.barrier()
    return load_data(cfg.data, cfg.train.seed, cfg.train.eval_split)


def run_train(cfg: Config, run_path: Optional[Path] = None) -> RunResult:
    info = start_distributed(cfg)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    # Absolute paths in the saved config: `eval --run` then works from any directory.
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    cfg.data.cache.dir = str(Path(cfg.data.cache.dir).expanduser().resolve())
    if cfg.data.group_file:
        cfg.data.group_file = str(Path(cfg.data.group_file).expanduser().resolve())
    # Rank 0 names the run folder (the default name has a timestamp) and every rank uses it.
    name = D.broadcast_object(cfg.train.run_name or _default_run_name(cfg))
    run = RunDir(cfg, name, is_main=info.is_main, path=run_path)
    try:
        if cfg.train.resume:
            logger.info("resuming in run folder %s (train.resume=%s)", run.path, cfg.train.resume)
        else:
            run.start_fresh()
        run.save_config(cfg)
        logger.info("run folder: %s (%d rank(s), launcher %s)", run.path, info.world_size, info.launcher)
        backbone = build_backbone(cfg.model)
        data = _load_data_once(cfg)
        run.write_json(FEWSHOT_RECORD, data.report)
        group = data.group
        logger.info("tasks: %s", ", ".join(f"{t.key} ({t.num_classes} classes)" for t in group.tasks))
        logger.info("splits: %s", ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()))
        split = cfg.train.eval_split
        label = method_label(cfg)
        history: List[Dict] = []
        extra: Dict = {}
        if cfg.method.name == "linear_probe":
            inputs = prepare_inputs(cfg, backbone, data, ("train", "val", split))
            # Every rank fits the same probe on all features (deterministic; no collectives needed).
            loaders = {s: inputs.loader(cfg, s, shard=False) for s in ("train", "val", split)}
            results, extra["chosen_C"] = run_linear_probe(backbone, group, loaders, cfg.method.lp_c_grid,
                                                          cfg.method.lp_search_steps, cfg.method.lp_max_iter, split)
        elif cfg.method.name == "zeroshot":
            model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, group))
            results = _evaluate_scope(cfg, scopes(cfg, group)[0], model, prepare_inputs(cfg, backbone, data, (split,)))
        else:
            # SIGTERM/SIGUSR1 during training: stop at the next step boundary, save, exit 75.
            with StopSignals() as signals:
                results, history = _train_and_evaluate(cfg, backbone, data, run, signals)
        run.write_json("results.json", {"method": label, "arch": cfg.model.arch, "split": split,
                                        "shots": cfg.data.shots, "seed": cfg.train.seed, **extra, **results})
        shots = f"{cfg.data.shots}-shot" if cfg.data.shots else "all training images"
        run.write_text("results.md", markdown_table(results, f"{label} on {cfg.data.dataset} ({split}, {shots}, "
                                                             f"seed {cfg.train.seed})"))
        log_results(results, split)
        return RunResult(run.path, results, history)
    finally:
        run.close()


def _checkpoint_meta(cfg: Config, group: TaskGroup) -> Dict:
    return checkpoint_meta(cfg.model.arch, method_label(cfg), group,
                           {**asdict(cfg.prompt), "meta_net": cfg.method.meta_net,
                            "meta_hidden": cfg.method.meta_hidden})


def _train_and_evaluate(cfg: Config, backbone, data: MultiTaskData, run: RunDir, signals: StopSignals):
    train_tf = train_transform(backbone.preprocess_cfg, cfg.data.train_augment)
    inputs = prepare_inputs(cfg, backbone, data, ("train", cfg.train.eval_split), train_tf)
    if D.any_rank(signals.received is not None):  # e.g. during a long feature-cache build
        raise Preempted("stop signal received before training started (cached features are kept)")
    parts, states, history = [], {}, []
    run_scopes = scopes(cfg, data.group)
    if cfg.train.task_weights and len(run_scopes) > 1:
        logger.warning("train.task_weights has no effect when each task trains on its own")
    if cfg.train.resume not in (None, "latest") and len(run_scopes) > 1:
        raise ConfigError("train.resume=<folder> names one scope's checkpoint; per-task training "
                          f"({len(run_scopes)} scopes) resumes with train.resume=latest")
    for i, scope in enumerate(run_scopes):
        if i > 0 and cfg.engine.zero_stage == 3:
            # A ZeRO-3 engine partitions and hooks the backbone it wraps: give each scope its own.
            seed_everything(cfg.train.seed, cfg.train.deterministic)
            backbone = build_backbone(cfg.model)
        seed_everything(cfg.train.seed, cfg.train.deterministic)  # each task's run independent of the others
        model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, scope.group))
        weights = scope.group.task_weights(cfg.train.task_weights) if scope.key == "joint" else None
        samples, feats = scope.select(data.splits["train"], inputs.features.get("train"))
        checkpoints = TrainingCheckpoints(run.path / "checkpoints" / scope.key, cfg.train.keep_checkpoints,
                                          _checkpoint_meta(cfg, scope.group))
        scope_history, engine = train_prompts(cfg, model, scope.group, samples, train_tf, run, weights,
                                              tag="" if scope.key == "joint" else f"{scope.key}: ", features=feats,
                                              checkpoints=checkpoints, signals=signals)
        history += scope_history
        states[scope.key] = engine.learnable_state_dict()
        # Evaluate now so that per-task runs hold one model at a time.
        parts.append(_evaluate_scope(cfg, scope, engine.module, inputs))
        engine.close()
        if D.any_rank(signals.received is not None) and i + 1 < len(run_scopes):
            raise Preempted(f"stop signal received after training {scope.key!r}: its checkpoint is saved")
    if run.is_main:
        save_prompt_checkpoint(run.path / CHECKPOINT_NAME, _checkpoint_meta(cfg, data.group), states)
    D.barrier()
    return merge_task_results(parts, data.group), history


def run_eval(cfg: Config, checkpoint: Optional[Path], out_dir: Optional[Path] = None) -> Dict:
    """Evaluate a trained prompt checkpoint (or zero-shot CLIP) on ``cfg.train.eval_split``."""
    label = method_label(cfg)
    if cfg.method.name == "linear_probe":
        raise ConfigError("eval: the linear probe keeps no checkpoint; rerun `train` with method.name=linear_probe")
    if cfg.method.name != "zeroshot" and checkpoint is None:
        raise ConfigError(f"eval: method {label} needs a prompt checkpoint (--run or --checkpoint)")
    info = start_distributed(cfg)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    backbone = build_backbone(cfg.model)
    data = _load_data_once(cfg)
    group, split = data.group, cfg.train.eval_split
    states = None
    if cfg.method.name != "zeroshot":
        states = load_prompt_checkpoint(checkpoint, _checkpoint_meta(cfg, group))
    # Eval logs join the run's log (rank 0 writes).
    run = RunDir(cfg, "", is_main=info.is_main, path=out_dir) if out_dir is not None else None
    try:
        results = _evaluate_checkpoint(cfg, backbone, data, states, checkpoint)
        log_results(results, split)
        if run is not None:
            run.write_json(f"eval_{split}.json", {"method": label, "arch": cfg.model.arch, "split": split,
                                                  **results})
            run.write_text(f"eval_{split}.md", markdown_table(results, f"{label} ({split})"))
    finally:
        if run is not None:
            run.close()
    return results


def _evaluate_checkpoint(cfg: Config, backbone, data: MultiTaskData, states: Optional[Dict],
                         checkpoint: Optional[Path]) -> Dict:
    parts = []
    inputs = prepare_inputs(cfg, backbone, data, (cfg.train.eval_split,))
    for scope in scopes(cfg, data.group):
        model = PromptClassifier(backbone, build_prompt_method(cfg, backbone, scope.group))
        if states is not None:
            if scope.key not in states:
                raise CheckpointError(f"checkpoint {checkpoint} has no prompts for {scope.key!r} "
                                      f"(it holds {sorted(states)}); was train.mode different?")
            load_learnable(model.method, states[scope.key], f"{checkpoint} [{scope.key}]")
        parts.append(_evaluate_scope(cfg, scope, model, inputs))
    return merge_task_results(parts, data.group)
