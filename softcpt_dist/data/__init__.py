"""Datasets: task groups, samples, few-shot subsets, transforms, and the registry of readers."""

from __future__ import annotations

import logging
from pathlib import Path

from softcpt_dist.config import ConfigError, DataConfig
from softcpt_dist.data.dataset import MultiTaskData, MultiTaskImageDataset, Sample
from softcpt_dist.data.fewshot import fewshot_subset
from softcpt_dist.data.synthetic import generate_synthetic, read_task_folders
from softcpt_dist.data.tasks import DataError, TaskGroup, TaskSpec

logger = logging.getLogger(__name__)

# Readers by `data.dataset` name. The paper's benchmark readers register here as they land.
_READERS = {"synthetic": read_task_folders, "task_folders": read_task_folders}


def load_data(cfg: DataConfig, seed: int) -> MultiTaskData:
    """Read the configured dataset and cut its few-shot training (and validation) subsets."""
    if cfg.dataset not in _READERS:
        raise ConfigError(f"data.dataset={cfg.dataset!r} is not available; known: {sorted(_READERS)}")
    root = Path(cfg.root)
    if cfg.dataset == "synthetic" and not (root / "tasks.json").is_file():
        if not cfg.generate_if_missing:
            raise DataError(f"built-in dataset not found at {root} (data.generate_if_missing=false)")
        generate_synthetic(root, cfg.synthetic)
    data = _READERS[cfg.dataset](root)
    if cfg.shots > 0:
        fs_seed = seed if cfg.fewshot_seed is None else cfg.fewshot_seed
        train, short = fewshot_subset(data.splits["train"], cfg.shots, fs_seed)
        val, _ = fewshot_subset(data.splits["val"], min(cfg.shots, 4), fs_seed)
        for (t, c), n in short.items():
            task = data.group.tasks[t]
            logger.warning("task %s class %r has %d training images (< %d shots): using all", task.key,
                           task.classnames[c], n, cfg.shots)
        data = MultiTaskData(data.group, {**data.splits, "train": train, "val": val})
    return data


__all__ = ["DataError", "MultiTaskData", "MultiTaskImageDataset", "Sample", "TaskGroup", "TaskSpec",
           "fewshot_subset", "generate_synthetic", "load_data", "read_task_folders"]
