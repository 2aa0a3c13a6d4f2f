"""The ``task_folders`` layout: the built-in dataset's on-disk form, also for user data of the same shape::

    root/tasks.json                              task keys, names, class names, metrics, templates
    root/<split>/<task key>/<class index>/*      split in train, val, test
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from softcpt_dist.data.dataset import IMAGE_EXTENSIONS, MultiTaskData, Sample
from softcpt_dist.data.tasks import DataError, TaskGroup, TaskSpec
from softcpt_dist.files import atomic_write_text

SPLITS = ("train", "val", "test")
MANIFEST = "tasks.json"


def write_task_manifest(root: Path, tasks) -> None:
    manifest = {"tasks": [{"key": t.key, "name": t.name, "classes": list(t.classnames), "metric": t.metric,
                           "template": t.template} for t in tasks]}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2))  # written last: marks a complete dataset


def read_task_folders(root: str | Path) -> MultiTaskData:
    """Read a ``tasks.json`` + ``<split>/<task key>/<class index>/`` tree into tasks and samples."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"task manifest not found: {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
        tasks = [TaskSpec(t["key"], t["name"], tuple(t["classes"]), t.get("metric", "accuracy"),
                          t.get("template", "a photo of a {}.")) for t in manifest["tasks"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"malformed task manifest {manifest_path}: {err!r}") from err
    group = TaskGroup(tasks)
    splits: Dict[str, List[Sample]] = {}
    for split in SPLITS:
        samples = []
        for t_idx, task in enumerate(tasks):
            task_dir = root / split / task.key
            if not task_dir.is_dir():
                raise DataError(f"missing folder for task {task.key!r}, split {split!r}: {task_dir}")
            for entry in sorted(task_dir.iterdir()):
                if not entry.is_dir():
                    continue
                if not entry.name.isdigit() or int(entry.name) >= task.num_classes:
                    raise DataError(f"class folder {entry} is not a class index of task {task.key!r} "
                                    f"(0..{task.num_classes - 1})")
                samples += [Sample(str(p), t_idx, int(entry.name)) for p in sorted(entry.iterdir())
                            if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not any(s.task == t_idx for s in samples):
                raise DataError(f"task {task.key!r} has no images in split {split!r} under {task_dir}")
        splits[split] = samples
    data = MultiTaskData(group, splits)
    data.check()
    return data
