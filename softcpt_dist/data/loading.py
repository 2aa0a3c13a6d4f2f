"""Reading the configured dataset: the reader named by ``data.dataset``, few-shot subsets, file checks.

``data.dataset`` names a reader:

- ``synthetic``: the built-in generated group (made on first use); ``task_folders``: the same layout
  for user data (``tasks.json`` + ``<split>/<task key>/<class index>/``);
- ``general10``, ``plant6``: the paper's groups from CoOp / official SoftCPT split files;
- ``fashion20``: Fashion-20 (``images/<task id>/<class id>/`` + ``task_info.csv``);
- ``split_dk``: any official multi-task ``split_dk_*.json`` (``data.group_file``);
- ``custom``: a YAML task group (``data.group_file``), e.g. RS-8;
- any name a package registers as a ``GeneratedDataset`` (``softcpt_dist.plugins.DATASETS``): ``micro``,
  the micro world's 6-task group (``softcpt_dist.micro``), is one.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

from softcpt_dist.config import ConfigError, DataConfig
from softcpt_dist.data.custom import read_custom_group
from softcpt_dist.data.dataset import MultiTaskData, Sample, load_image
from softcpt_dist.data.fewshot import fewshot_subset
from softcpt_dist.data.official_fewshot import match_records, read_official_fewshot
from softcpt_dist.data.paper_groups import (GROUPS, official_fewshot_file, read_benchmark, read_fashion20,
                                            read_split_dk_group)
from softcpt_dist.data.subsample import subsample_classes, subsample_tasks
from softcpt_dist.data.synthetic import generate_synthetic
from softcpt_dist.data.task_folders import MANIFEST, read_task_folders
from softcpt_dist.data.tasks import DataError
from softcpt_dist.files import exclusive
from softcpt_dist.plugins import DATASETS as DATASET_PROVIDERS, lookup, names

logger = logging.getLogger(__name__)

_READERS = {
    "synthetic": lambda cfg: read_task_folders(cfg.root),
    "task_folders": lambda cfg: read_task_folders(cfg.root),
    "general10": lambda cfg: read_benchmark("general10", cfg.root, cfg.split_format),
    "plant6": lambda cfg: read_benchmark("plant6", cfg.root, cfg.split_format),
    "fashion20": lambda cfg: read_fashion20(cfg.root),
    "split_dk": lambda cfg: read_split_dk_group(cfg.group_file, cfg.root),
    "custom": lambda cfg: _read_custom(cfg),
}
DATASETS = tuple(_READERS)  # the readers of this module; known_datasets() adds the registered ones
VAL_SHOTS_MAX = 4  # few-shot validation keeps min(K, 4) images per class (CoOp / SoftCPT)


def _read_custom(cfg: DataConfig) -> MultiTaskData:
    if not cfg.group_file:
        raise ConfigError("data.dataset=custom needs data.group_file (the task group YAML)")
    return read_custom_group(cfg.group_file, cfg.root)


@dataclass(frozen=True)
class GeneratedDataset:
    """A dataset written to ``data.root`` on first use and read as task folders: ``is_complete(root, cfg)``
    says whether ``root`` holds it as ``cfg`` (the ``DataConfig``) asks, ``write(root, cfg)`` writes it."""

    is_complete: Callable[[Path, DataConfig], bool]
    write: Callable[[Path, DataConfig], None]


SYNTHETIC = GeneratedDataset(lambda root, cfg: (root / MANIFEST).is_file(),
                             lambda root, cfg: generate_synthetic(root, cfg.synthetic))


def _generated(name: str):
    """The ``GeneratedDataset`` of ``data.dataset``, or None for a reader of existing files."""
    if name == "synthetic":
        return SYNTHETIC
    return None if name in _READERS else lookup(DATASET_PROVIDERS, name)


def known_datasets() -> List[str]:
    """Every ``data.dataset`` name: the readers here and the registered generated datasets."""
    return sorted(set(_READERS) | set(names(DATASET_PROVIDERS)))


def ensure_builtin_data(cfg: DataConfig) -> None:
    """Generate a generated dataset (synthetic, micro, ...) if it is configured and missing (call on one rank
    first; of several jobs, one generates it and the others wait for it)."""
    dataset = _generated(cfg.dataset)
    if dataset is None:
        return
    root = Path(cfg.root)
    with exclusive(root):
        if dataset.is_complete(root, cfg):
            return
        if not cfg.generate_if_missing:
            raise DataError(f"built-in dataset not found at {root} (data.generate_if_missing=false)")
        dataset.write(root, cfg)


def read_dataset(cfg: DataConfig) -> MultiTaskData:
    """All splits of the configured dataset (and task subset), before few-shot sampling."""
    if cfg.dataset not in _READERS and _generated(cfg.dataset) is None:
        raise ConfigError(f"data.dataset={cfg.dataset!r} is not available; known: {known_datasets()}")
    ensure_builtin_data(cfg)
    data = _READERS[cfg.dataset](cfg) if cfg.dataset in _READERS else read_task_folders(cfg.root)
    if cfg.tasks:
        data = data.select_tasks(cfg.tasks)
    data.check()
    for problem in data.problems:
        logger.warning("%s", problem)
    return data


def _official_subsets(data: MultiTaskData, cfg: DataConfig, seed: int, report: Dict) -> MultiTaskData:
    """Train and val subsets from the official few-shot files (``data.fewshot_source=official``)."""
    if cfg.dataset not in GROUPS:
        raise ConfigError(f"data.fewshot_source=official reads the official per-dataset files of {sorted(GROUPS)}; "
                          f"data.dataset={cfg.dataset} has none")
    if cfg.shots <= 0:
        raise ConfigError("data.fewshot_source=official needs data.shots > 0 (the files hold K-shot subsets)")
    fs_seed = fewshot_seed(cfg, seed)
    subsets: Dict[str, List[Sample]] = {"train": [], "val": []}
    files = []
    for t, task in enumerate(data.group.tasks):
        path = official_fewshot_file(cfg.dataset, cfg.root, task.key, cfg.shots, fs_seed)
        records = read_official_fewshot(path)
        for split in subsets:
            subsets[split] += match_records(records[split], data.splits[split], t, f"{path} [{split}]")
        files.append(str(path))
    report.update(seed=fs_seed, val_shots=min(cfg.shots, VAL_SHOTS_MAX), source="official", files=files)
    return MultiTaskData(data.group, {**data.splits, **subsets}, data.problems)


def fewshot_seed(cfg: DataConfig, seed: int) -> int:
    """``data.fewshot_seed``, or the run's seed when it is null."""
    return seed if cfg.fewshot_seed is None else cfg.fewshot_seed


def load_data(cfg: DataConfig, seed: int, eval_split: str = "test") -> MultiTaskData:
    """Read the dataset, cut its few-shot training/validation subsets and check the files it uses.

    ``data.report`` (a dict) records the subsets, classes short of K images and skipped images,
    for the run folder's ``fewshot_split.json``.
    """
    data = read_dataset(cfg)
    report: Dict = {"dataset": cfg.dataset, "shots": cfg.shots, "short_classes": [], "skipped_images": []}
    if cfg.fewshot_source == "official":
        data = _official_subsets(data, cfg, seed, report)
    elif cfg.shots > 0:
        fs_seed = fewshot_seed(cfg, seed)
        val_shots = min(cfg.shots, VAL_SHOTS_MAX)
        train, short = fewshot_subset(data.splits["train"], cfg.shots, fs_seed, data.group)
        val, short_val = fewshot_subset(data.splits["val"], val_shots, fs_seed, data.group)
        report.update(seed=fs_seed, val_shots=val_shots)
        for split, table, k in (("train", short, cfg.shots), ("val", short_val, val_shots)):
            for (t, c), n in sorted(table.items()):
                task = data.group.tasks[t]
                report["short_classes"].append({"split": split, "task": task.key, "class": task.classnames[c],
                                                "available": n, "wanted": k})
                logger.warning("task %s class %r has %d %s images (< %d): using all", task.key,
                               task.classnames[c], n, split, k)
        data = MultiTaskData(data.group, {**data.splits, "train": train, "val": val}, data.problems)
    # After the few-shot cut: a base run trains on the images a run on all classes (or tasks) would.
    data = subsample_classes(subsample_tasks(data, cfg.subsample_tasks), cfg.subsample_classes)
    report.update(subsample_classes=cfg.subsample_classes, subsample_tasks=cfg.subsample_tasks)
    used = ("train", "val", eval_split)
    if cfg.skip_bad_images:
        bad = find_unreadable({s: data.splits[s] for s in used}, cfg.num_workers)
        if bad:
            bad_paths = {p for p, _ in bad}
            for path, reason in bad:
                logger.warning("skipping unreadable image %s: %s", path, reason)
            logger.warning("skipped %d unreadable images (data.skip_bad_images=true)", len(bad_paths))
            report["skipped_images"] = [{"path": p, "reason": r} for p, r in bad]
            data = MultiTaskData(data.group, {k: [s for s in v if s.path not in bad_paths]
                                              for k, v in data.splits.items()}, data.problems)
    else:
        check_files_exist({s: data.splits[s] for s in used})
    for split in ("train", eval_split):
        have = {s.task for s in data.splits[split]}
        empty = [t.key for i, t in enumerate(data.group.tasks) if i not in have]
        if empty:
            why = " (data.skip_bad_images skipped the rest)" if report["skipped_images"] else ""
            raise DataError(f"task(s) {empty} have no {split} images{why}")
        problems = empty_classes(data, split)
        if problems:  # as `softcpt-dist data check` reports them
            raise DataError("; ".join(problems) + " (a class without images cannot be learned or scored)")
    report["train"] = [[s.path, data.group.tasks[s.task].key, s.label] for s in data.splits["train"]]
    report["val"] = [[s.path, data.group.tasks[s.task].key, s.label] for s in data.splits["val"]]
    data.report = report
    return data


def empty_classes(data: MultiTaskData, split: str) -> List[str]:
    """One line per task that has classes without ``split`` images, naming them."""
    out = []
    for task, per_class in zip(data.group.tasks, data.counts(split)):
        empty = [task.classnames[c] for c, n in enumerate(per_class) if n == 0]
        if empty:
            out.append(f"task {task.key}: {len(empty)} class(es) without {split} images: {empty[:5]}")
    return out


def check_files_exist(splits: Dict[str, List[Sample]]) -> None:
    """Every listed image must exist; the error names the first missing files and their count."""
    missing = [(split, s.path) for split, samples in splits.items() for s in samples if not os.path.isfile(s.path)]
    if missing:
        listed = "; ".join(f"{p} ({split})" for split, p in missing[:5])
        raise DataError(f"{len(missing)} listed image file(s) not found, e.g. {listed}")


def _try_decode(path: str):
    try:
        load_image(path)
        return None
    except DataError as err:
        return str(err)


def find_unreadable(splits: Dict[str, List[Sample]], workers: int = 0) -> List[tuple]:
    """Decode every listed image (threads); ``(path, reason)`` for each missing or undecodable one."""
    paths = sorted({s.path for samples in splits.values() for s in samples})
    with ThreadPoolExecutor(max_workers=max(4, workers)) as pool:
        reasons = list(pool.map(_try_decode, paths, chunksize=64))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]

