"""Parsers of the split files users already have: CoOp's ``split_zhou_*.json``, the official SoftCPT
``split_dk_*.json``, FGVC-Aircraft's text lists and Fashion-20's ``task_info.csv``.

Each parser returns plain ``(path, label)`` lists per split (paths joined onto the image prefix)
and the class / task names the file carries; every malformed entry is an error naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from softcpt_dist.data.tasks import DataError
from softcpt_dist.data.tasks import clean_classname as clean
from softcpt_dist.seeding import keyed_random

SPLITS = ("train", "val", "test")
Items = List[Tuple[str, int]]


@dataclass
class TaskSplits:
    """One task read from a split file: per-split ``(path, label)`` items and what the file names."""

    splits: Dict[str, Items]
    classnames: Optional[List[str]] = None  # in label order, when the file carries them
    task_name: Optional[str] = None
    metric: Optional[str] = None  # accuracy | mean_per_class_accuracy
    extra: Dict = field(default_factory=dict)


def _load_json(path: Path) -> Dict:
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"split file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"split file {path}: expected an object with train/val/test lists")
    for split in SPLITS:
        if not isinstance(data.get(split), list):
            raise DataError(f"split file {path}: missing the {split!r} list")
    return data


def read_split_zhou(path: Path, prefix: Path) -> TaskSplits:
    """CoOp: ``{"train"|"val"|"test": [[relative path, label, class name], ...]}``."""
    data = _load_json(path)
    names: Dict[int, str] = {}
    splits: Dict[str, Items] = {}
    for split in SPLITS:
        items = []
        for i, entry in enumerate(data[split]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], int)):
                raise DataError(f"{path}: {split}[{i}] is not [path, label, classname]: {entry!r}")
            rel, label, cname = entry
            if label < 0:
                raise DataError(f"{path}: {split}[{i}] has negative label {label}")
            if names.setdefault(label, cname) != cname:
                raise DataError(f"{path}: label {label} is named both {names[label]!r} and {cname!r}")
            items.append((str(prefix / rel), label))
        splits[split] = items
    n = max(names) + 1 if names else 0
    missing = [k for k in range(n) if k not in names]
    if missing:
        raise DataError(f"{path}: labels {missing[:10]} never occur, so their class names are unknown")
    return TaskSplits(splits, [names[k] for k in range(n)])


def _one_int(value, what: str, where: str) -> int:
    """split_dk stores labels and tasks as one-element lists; plain ints are accepted too."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where}: {what} must be an integer or [integer], got {value!r}")
    return value


_DK_METRICS = {"mean_acc": "mean_per_class_accuracy", "overall_acc": "accuracy"}


def read_split_dk(path: Path, prefix: Path, classnames: Optional[List[List[str]]] = None) -> List[TaskSplits]:
    """Official SoftCPT: entries ``[relative path, [label], [task]]`` plus a ``meta`` block of lists
    indexed by task id (``taskid2cname``, ``taskid2tname``, ``taskid2metric``, ...).

    ``classnames``: class names per task known from elsewhere (Fashion-20's task_info.csv); the
    meta block may then be absent, and where present must agree with them.
    """
    data = _load_json(path)
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    cnames = meta.get("taskid2cname")
    if classnames is not None:
        if cnames is not None:
            theirs = [[clean(str(c)) for c in t] if isinstance(t, list) else t for t in cnames]
            ours = [[clean(c) for c in t] for t in classnames]
            for t in range(max(len(theirs), len(ours))):
                a = theirs[t] if t < len(theirs) else None
                b = ours[t] if t < len(ours) else None
                if a != b:
                    raise DataError(f"split file {path}: meta.taskid2cname[{t}] = {a} disagrees with the task "
                                    f"list's classes {b}")
        cnames = classnames
    if not isinstance(cnames, list):
        raise DataError(f"split file {path}: missing meta.taskid2cname (class names per task)")
    n_tasks = len(cnames)
    per_task = [{s: [] for s in SPLITS} for _ in range(n_tasks)]
    for split in SPLITS:
        for i, entry in enumerate(data[split]):
            where = f"{path}: {split}[{i}]"
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
                raise DataError(f"{where} is not [path, [label], [task]]: {entry!r}")
            label, task = _one_int(entry[1], "label", where), _one_int(entry[2], "task", where)
            if not 0 <= task < n_tasks:
                raise DataError(f"{where}: unknown task id {task}; meta.taskid2cname has {n_tasks} tasks")
            if not 0 <= label < len(cnames[task]):
                raise DataError(f"{where}: label {label} out of range for task {task} "
                                f"({len(cnames[task])} classes)")
            per_task[task][split].append((str(prefix / entry[0]), label))
    names, metrics = meta.get("taskid2tname"), meta.get("taskid2metric")
    out = []
    for t in range(n_tasks):
        if not isinstance(cnames[t], list) or not all(isinstance(c, str) for c in cnames[t]):
            raise DataError(f"split file {path}: meta.taskid2cname[{t}] must be a list of class names")
        metric = metrics[t] if isinstance(metrics, list) and t < len(metrics) else None
        if metric is not None and metric not in _DK_METRICS:
            raise DataError(f"split file {path}: meta.taskid2metric[{t}]={metric!r} is not one of "
                            f"{list(_DK_METRICS)}")
        out.append(TaskSplits(per_task[t], list(cnames[t]),
                              names[t] if isinstance(names, list) and t < len(names) else None,
                              _DK_METRICS.get(metric)))
    return out


def read_fgvc_aircraft(dataset_dir: Path) -> TaskSplits:
    """FGVC-Aircraft as CoOp reads it: ``variants.txt`` (class per line) and
    ``images_variant_{train,val,test}.txt`` lines ``<image id> <variant name>``, images in ``images/``."""
    variants_file = dataset_dir / "variants.txt"
    if not variants_file.is_file():
        raise DataError(f"FGVC-Aircraft class list not found: {variants_file}")
    classes = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in SPLITS:
        list_file = dataset_dir / f"images_variant_{split}.txt"
        if not list_file.is_file():
            raise DataError(f"FGVC-Aircraft split list not found: {list_file}")
        items = []
        for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
            parts = line.strip().split(" ")
            if not line.strip():
                continue
            cname = " ".join(parts[1:])
            if len(parts) < 2 or cname not in index:
                raise DataError(f"{list_file}:{line_no}: unknown variant {cname!r} (not in {variants_file.name})")
            items.append((str(dataset_dir / "images" / f"{parts[0]}.jpg"), index[cname]))
        splits[split] = items
    return TaskSplits(splits, classes)


def read_task_info(path: Path) -> List[Tuple[str, List[str]]]:
    """Fashion-20's ``task_info.csv``: a header, then one tab-separated row per task, in task-id
    order as the official code reads it: ``<id> <task name> <description> <class names, comma-separated>``;
    returns (name, classes) per task."""
    if not path.is_file():
        raise DataError(f"task list not found: {path}")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines()[1:], start=2):
        if not line.strip():
            continue
        cols = line.rstrip("\n").split("\t")
        if len(cols) != 4:
            raise DataError(f"{path}:{line_no}: expected 4 tab-separated columns "
                            f"(task id, task name, description, class names), got {len(cols)}")
        classes = [c.strip() for c in cols[3].split(",") if c.strip()]
        if not cols[1].strip() or not classes:
            raise DataError(f"{path}:{line_no}: a task needs a name and at least one class name")
        rows.append((cols[1].strip(), classes))
    if not rows:
        raise DataError(f"{path}: no tasks listed")
    return rows


def random_split(items: Items, key: str, fractions=(0.5, 0.2, 0.3)) -> Dict[str, Items]:
    """Split each class's items train/val/test by ``fractions`` (the official 50/20/30), as a pure
    function of the item list and ``key``: for datasets shipped without a split file."""
    by_label: Dict[int, Items] = {}
    for item in sorted(items):
        by_label.setdefault(item[1], []).append(item)
    out: Dict[str, Items] = {s: [] for s in SPLITS}
    for label, group in sorted(by_label.items()):
        keyed_random(key, label).shuffle(group)
        n_train = max(1, round(fractions[0] * len(group)))
        n_val = round(fractions[1] * len(group))
        out["train"] += group[:n_train]
        out["val"] += group[n_train:n_train + n_val]
        out["test"] += group[n_train + n_val:]
    return out
