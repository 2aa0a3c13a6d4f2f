"""User-defined task groups from a YAML file: how most users bring their own data (e.g. RS-8).

Each task names its classes and where its images are: an image-folder tree or one CSV per split.
Relative paths resolve against ``data.root``::

    name: my-group                       # optional, used in reports
    tasks:
      - key: eurosat                     # short id: folder/CLI name
        name: land use                   # task name in the task prompt
        classes: [annual crop land, forest, river]   # optional with image_folder (sorted folder names)
        metric: accuracy                 # or mean_per_class_accuracy
        template: "a centered satellite photo of {}."  # zero-shot template
        image_folder: eurosat            # eurosat/{train,val,test}/<class>/*.jpg
      - key: ucm
        name: aerial scene
        classes: [agricultural, airplane, beach]
        csv: {train: ucm/train.csv, val: ucm/val.csv, test: ucm/test.csv}
        image_root: ucm                  # CSV paths resolve here (default: data.root)

A class folder is matched to a class by its name (underscores read as spaces) or its index.
CSV rows are ``path,label`` (an optional ``path,label`` header); a label is a class name or index.
``val`` is optional in both forms.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from softcpt_dist.data.dataset import IMAGE_EXTENSIONS, MultiTaskData, assemble
from softcpt_dist.data.tasks import DataError, TaskSpec, clean_classname

SPLITS = ("train", "val", "test")
_TASK_KEYS = {"key", "name", "classes", "metric", "template", "image_folder", "csv", "image_root"}


def read_custom_group(group_file: str | Path, root: str | Path) -> MultiTaskData:
    group_file, root = Path(group_file), Path(root)
    if not group_file.is_file():
        raise DataError(f"task group file not found: {group_file}")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(group_file))
    except Exception as err:
        raise DataError(f"cannot parse task group file {group_file}: {err}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list) or not spec["tasks"]:
        raise DataError(f"{group_file}: expected a mapping with a non-empty 'tasks' list")
    if not root.is_dir():
        raise DataError(f"data root not found: {root} (data.root, for {group_file})")
    tasks, parts = [], []
    for i, entry in enumerate(spec["tasks"]):
        where = f"{group_file} task #{i + 1}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping, got {entry!r}")
        unknown = sorted(set(entry) - _TASK_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown keys {unknown}; allowed: {sorted(_TASK_KEYS)}")
        for key in ("key", "name"):
            if not entry.get(key):
                raise DataError(f"{where}: missing {key!r}")
        where = f"{group_file} task {entry['key']!r}"
        if ("image_folder" in entry) == ("csv" in entry):
            raise DataError(f"{where}: give exactly one of 'image_folder' or 'csv'")
        classes = entry.get("classes")
        if "image_folder" in entry:
            task_dir = _resolve(root, entry["image_folder"])
            classes = classes or _folder_classes(task_dir, where)
            task = _task_spec(entry, classes, where)
            parts.append(_read_image_folder(task, task_dir))
        else:
            if not classes:
                raise DataError(f"{where}: a CSV task needs its 'classes' list")
            task = _task_spec(entry, classes, where)
            image_root = _resolve(root, entry.get("image_root", "."))
            parts.append(_read_csvs(task, entry["csv"], root, image_root, where))
        tasks.append(task)
    return assemble(tasks, parts, str(group_file))


def _resolve(root: Path, path: str) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else root / p


def _task_spec(entry: Dict, classes: List, where: str) -> TaskSpec:
    if not isinstance(classes, list) or not all(isinstance(c, (str, int)) for c in classes):
        raise DataError(f"{where}: 'classes' must be a list of names")
    try:
        return TaskSpec(str(entry["key"]), str(entry["name"]), tuple(clean_classname(str(c)) for c in classes),
                        entry.get("metric", "accuracy"), entry.get("template", "a photo of a {}."))
    except DataError as err:
        raise DataError(f"{where}: {err}") from err


def _folder_classes(task_dir: Path, where: str) -> List[str]:
    train = task_dir / "train"
    if not train.is_dir():
        raise DataError(f"{where}: image folder split not found: {train}")
    return sorted(p.name for p in train.iterdir() if p.is_dir())


def _class_of(task: TaskSpec, name: str) -> Optional[int]:
    cleaned = clean_classname(name)
    if cleaned in task.classnames:
        return task.classnames.index(cleaned)
    if name.isdigit() and int(name) < task.num_classes:
        return int(name)
    return None


def _read_image_folder(task: TaskSpec, task_dir: Path) -> Dict[str, List[Tuple[str, int]]]:
    out: Dict[str, List[Tuple[str, int]]] = {}
    for split in SPLITS:
        split_dir = task_dir / split
        if not split_dir.is_dir():
            if split == "val":
                continue
            raise DataError(f"task {task.key!r}: split folder not found: {split_dir}")
        items = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            label = _class_of(task, class_dir.name)
            if label is None:
                raise DataError(f"task {task.key!r}: class folder {class_dir} is not one of its classes "
                                f"{list(task.classnames)}")
            items += [(str(f), label) for f in sorted(class_dir.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        out[split] = items
    return out


def _read_csvs(task: TaskSpec, files, root: Path, image_root: Path, where: str) -> Dict[str, List[Tuple[str, int]]]:
    if not isinstance(files, dict) or not {"train", "test"} <= set(files) or not set(files) <= set(SPLITS):
        raise DataError(f"{where}: 'csv' must map train, test (and optionally val) to CSV files")
    out = {}
    for split, name in files.items():
        path = _resolve(root, name)
        if not path.is_file():
            raise DataError(f"task {task.key!r}: {split} CSV not found: {path}")
        items = []
        with open(path, newline="") as fh:
            for line_no, row in enumerate(csv.reader(fh), start=1):
                if not row or (line_no == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                    continue
                if len(row) != 2:
                    raise DataError(f"{path}:{line_no}: expected 'path,label', got {row}")
                img, label_text = row[0].strip(), row[1].strip()
                label = _class_of(task, label_text)
                if label is None:
                    raise DataError(f"{path}:{line_no}: unknown class {label_text!r} of task {task.key!r} "
                                    f"(classes: {list(task.classnames)})")
                items.append((str(_resolve(image_root, img)), label))
        out[split] = items
    return out
