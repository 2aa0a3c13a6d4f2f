"""The Trainer: one run built from its config, the same way for ``train``, ``eval`` and ``profile`` (and so
for ``scaling``, whose points are profiles).

It joins the process group and resolves the run (``start_run``), seeds, builds the frozen backbone,
reads the data (rank 0 generates built-in data first) and splits the run into scopes; then, per scope,
it builds the classifier, the inputs (images or cached features), the training job and its checkpoints,
and prepares or runs its training (``scope_training.py``). A new option is threaded through here once.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from softcpt_dist import distributed as D
from softcpt_dist.config import Config, ConfigError, DataConfig, MethodConfig, TrainConfig
from softcpt_dist.data.dataset import MultiTaskData
from softcpt_dist.data.loading import ensure_builtin_data, load_data
from softcpt_dist.data.transforms import train_transform
from softcpt_dist.model import PromptClassifier, build_backbone, build_method, method_class
from softcpt_dist.seeding import seed_everything
from softcpt_dist.step_phases import NULL_TIMER
from softcpt_dist.training.checkpoint import TrainingCheckpoints, checkpoint_meta, resume_settings
from softcpt_dist.training.engine import TrainEngine, partitions_its_module
from softcpt_dist.training.inputs import Inputs, prepare_inputs
from softcpt_dist.training.resolved import start_run
from softcpt_dist.training.scope_training import (PreparedTraining, ScopeJob, check_training_setup,
                                                  prepare_training, run_prepared)
from softcpt_dist.training.scopes import Scope, scopes
from softcpt_dist.training.signals import StopSignals

logger = logging.getLogger(__name__)


def load_data_once(dcfg: DataConfig, train: TrainConfig) -> MultiTaskData:
    """Every rank reads the data; only rank 0 generates the built-in dataset when it is missing."""
    if D.rank() == 0:
        ensure_builtin_data(dcfg)
    D.barrier()
    return load_data(dcfg, train.seed, train.eval_split)


class Trainer:
    """A run's components, built from ``cfg`` in one place.

    ``run_path``/``name_folder``: the run folder (see ``start_run``). After construction: ``ctx`` (world,
    device, resolved data paths, run folder), ``backbone``, ``data``, ``scopes`` and ``train_transform``.
    """

    def __init__(self, cfg: Config, run_path: Optional[Path] = None, name_folder: bool = False):
        self.cfg = cfg
        self.method = method_class(cfg.method, cfg.prompt)
        self.ctx = start_run(cfg, run_path, name_folder)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.backbone = build_backbone(cfg.model, self.ctx.device, cfg.text, cfg.kernels)
        self.method.check_setup(cfg, self.backbone)
        self.data = load_data_once(self.ctx.data, cfg.train)
        self.scopes: List[Scope] = scopes(cfg.train, cfg.method, self.data.group)
        self.train_transform: Callable = train_transform(self.backbone.preprocess_cfg, cfg.data.train_augment)

    def inputs(self, splits: Sequence[str], augment_train: bool = False) -> Inputs:
        """What the model reads per split (cached features with ``data.cache``); ``augment_train``: the
        training split as training sees it (augmented views, or images augmented on the fly)."""
        return prepare_inputs(self.backbone, self.data, splits, self.ctx.data, self.cfg.train,
                              self.cfg.model.precision, self.train_transform if augment_train else None)

    def classifier(self, group, cfg: Optional[Config] = None) -> PromptClassifier:
        """``cfg``'s method (default the run's) on the backbone for ``group``, its class prompts sharded over
        ranks per ``text.shard``."""
        cfg = cfg or self.cfg
        return PromptClassifier(self.backbone, build_method(self.backbone, group, cfg.method, cfg.prompt), cfg.text,
                                cfg.kernels)

    def scope_classifier(self, scope: Scope) -> PromptClassifier:
        """``scope``'s classifier, seeded as every scope is (independently of the others), so that tensors a
        checkpoint does not hold (a frozen class context) start where training's started."""
        seed_everything(self.cfg.train.seed, self.cfg.train.deterministic)
        return self.classifier(scope.group)

    def check_training(self) -> None:
        """What training would refuse, refused now, before the run folder is touched."""
        steps = self.method.official_modules(self.cfg.method) if self.cfg.optim.official_stepping else 1
        check_training_setup({s.key: s.select(self.data.splits["train"])[0] for s in self.scopes}, self.cfg,
                             self.ctx.world.world_size, steps)

    def job(self, scope: Scope, inputs: Inputs, run=None, on_resumed: Optional[Callable] = None) -> ScopeJob:
        """``scope``'s training job: a fresh classifier (seeded as every scope is, independently of the
        others), its samples or cached features, task weights and, with a run folder, its checkpoints.
        Under ZeRO-3 every scope after the first gets a backbone of its own (its engine partitions it)."""
        if scope is not self.scopes[0] and partitions_its_module(self.cfg.engine):
            seed_everything(self.cfg.train.seed, self.cfg.train.deterministic)
            self.backbone = build_backbone(self.cfg.model, self.ctx.device, self.cfg.text, self.cfg.kernels)
        model = self.scope_classifier(scope)
        weights = scope.group.task_weights(self.cfg.train.task_weights) if scope.key == "joint" else None
        samples, features = scope.select(self.data.splits["train"], inputs.features.get("train"))
        checkpoints = None
        if run is not None:
            cfg = self.cfg
            checkpoints = TrainingCheckpoints(run.path / "checkpoints" / scope.key, cfg.train.keep_checkpoints,
                                              checkpoint_meta(cfg.model, cfg.method, cfg.prompt, scope.group, cfg.data),
                                              resume_settings(cfg.model, cfg.optim, self.ctx.data, cfg.train, samples),
                                              on_resumed=on_resumed)
        return ScopeJob(model, scope.group, samples, self.train_transform, features, weights, scope.key, run,
                        checkpoints)

    def prepare(self, job: ScopeJob, signals: StopSignals, timer=NULL_TIMER) -> PreparedTraining:
        """``job``'s engine, loader and loop, ready to run from the start (what ``profile`` times)."""
        return prepare_training(job, self.cfg, signals, self.ctx.world, timer)

    def train(self, job: ScopeJob, signals: StopSignals) -> Tuple[List[Dict], TrainEngine]:
        """Train ``job`` (resuming from its checkpoints under ``train.resume``): its records and engine."""
        return run_prepared(self.prepare(job, signals), job, self.cfg)

    def with_method(self, name: str) -> Config:
        """The run's config with another method at its default settings (e.g. zero-shot CLIP beside a
        trained run)."""
        return config_with_method(self.cfg, name)


def config_with_method(cfg: Config, name: str) -> Config:
    """``cfg`` with method ``name`` at its default settings (none of the run's method options)."""
    return replace(cfg, method=MethodConfig(name=name))


def refuse_mixed_resume(trainer: Trainer) -> None:
    """A resumed run's checkpoints must be of this run's scopes (method and mode unchanged)."""
    cfg, saved = trainer.cfg, trainer.ctx.path / "checkpoints"
    keys = [s.key for s in trainer.scopes]
    other = sorted({p.name for p in saved.iterdir() if p.is_dir()} - set(keys)) \
        if cfg.train.resume and saved.is_dir() else []
    if other:
        raise ConfigError(f"train.resume: run folder {trainer.ctx.path} holds training checkpoints of {other}, not of "
                          f"this run's {keys}: was method.name, method.coop_mode or train.mode different? "
                          "(resume with those, or use another train.run_name)")
