"""The paper's benchmark groups, read from the folders and split files users already have.

``data.root`` is the folder that holds the datasets' folders (CoOp's ``DATA`` root). For every
dataset of General-10 and Plant-6 the split file is, with ``data.split_format``:

- ``auto`` (default): the official SoftCPT ``split_dk_<Name>.json`` if present, else CoOp's
  ``split_zhou_<Name>.json``;
- ``split_dk`` / ``split_zhou``: only that one.

FGVC-Aircraft has no JSON in either codebase: it is read from its text lists. Fashion-20 is
``fashion20/images/<task id>/<class id>/*`` with ``fashion20/task_info.csv`` (task and class names)
and ``fashion20/split_dk_Fashion20.json``; without that file a deterministic per-class 50/20/30
split (the official ratios) is made and reported.

Task names: a split_dk file's ``meta.taskid2tname``, else a ``task_name.txt`` in the dataset
folder (as the official code keeps them), else the names below. Class names are cleaned as CoOp
does (underscores -> spaces; Caltech101 and EuroSAT renamed).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from softcpt_dist.config import ConfigError, DataConfig, choices
from softcpt_dist.data.dataset import IMAGE_EXTENSIONS, MultiTaskData, assemble
from softcpt_dist.data.split_files import (TaskSplits, random_split, read_fgvc_aircraft, read_split_dk,
                                           read_split_zhou, read_task_info)
from softcpt_dist.data.tasks import DataError, TaskSpec, clean_classname

logger = logging.getLogger(__name__)

MEAN_PC, OVERALL = "mean_per_class_accuracy", "accuracy"


@dataclass(frozen=True)
class BenchmarkDataset:
    key: str
    dataset_dir: str  # folder under data.root
    image_dir: str  # prefix of the split files' relative paths, under dataset_dir ("" = dataset_dir)
    split_name: str  # split_dk_<split_name>.json / split_zhou_<split_name>.json; "" = text lists (FGVC)
    task_name: str
    num_classes: int  # the paper's count; a different count is reported
    metric: str
    template: str  # zero-shot template (CoOp / official SoftCPT)
    rename: Dict[str, str] = field(default_factory=dict)  # CoOp's NEW_CNAMES
    ignored: Tuple[str, ...] = ()  # classes CoOp drops


CALTECH_RENAME = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_RENAME = {"AnnualCrop": "Annual Crop Land", "Forest": "Forest",
                  "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
                  "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
                  "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
                  "River": "River", "SeaLake": "Sea or Lake"}

GENERAL10 = (
    BenchmarkDataset("caltech101", "caltech-101", "101_ObjectCategories", "Caltech101",
                     "generic object recognition", 100, MEAN_PC, "a photo of a {}.", CALTECH_RENAME,
                     ("BACKGROUND_Google", "Faces_easy")),
    BenchmarkDataset("dtd", "dtd", "images", "DescribableTextures", "texture recognition", 47, OVERALL,
                     "{} texture."),
    BenchmarkDataset("eurosat", "eurosat", "2750", "EuroSAT", "satellite land use classification", 10, OVERALL,
                     "a centered satellite photo of {}.", EUROSAT_RENAME),
    BenchmarkDataset("fgvc_aircraft", "fgvc_aircraft", "images", "", "aircraft model recognition", 100, MEAN_PC,
                     "a photo of a {}, a type of aircraft."),
    BenchmarkDataset("food101", "food-101", "images", "Food101", "food recognition", 101, OVERALL,
                     "a photo of {}, a type of food."),
    BenchmarkDataset("oxford_flowers", "oxford_flowers", "jpg", "OxfordFlowers", "flower species recognition", 102,
                     MEAN_PC, "a photo of a {}, a type of flower."),
    BenchmarkDataset("oxford_pets", "oxford_pets", "images", "OxfordPets", "pet breed recognition", 37, MEAN_PC,
                     "a photo of a {}, a type of pet."),
    BenchmarkDataset("stanford_cars", "stanford_cars", "", "StanfordCars", "car model recognition", 196, OVERALL,
                     "a photo of a {}."),
    BenchmarkDataset("sun397", "sun397", "SUN397", "SUN397", "scene recognition", 397, OVERALL, "a photo of a {}."),
    BenchmarkDataset("ucf101", "ucf101", "UCF-101-midframes", "UCF101", "human action recognition", 101, OVERALL,
                     "a photo of a person doing {}."),
)

PLANT6 = (
    BenchmarkDataset("fruit_vegetable", "fruit_vegetable", "images", "FruitVegetable",
                     "fruits and vegetables image classification", 36, OVERALL,
                     "a photo of a {}, a type of fruit or vegetable."),
    BenchmarkDataset("kaggle_flower", "kaggle_flower_recognition", "flowers", "kaggle_flower",
                     "flower image classification", 5, OVERALL, "a photo of a {}, a type of flower."),
    BenchmarkDataset("kaggle_mushroom", "kaggle_mushroom", "Mushrooms", "KaggleMushroom",
                     "mushroom image classification", 9, OVERALL, "a photo of a {}, a type of mushroom."),
    BenchmarkDataset("kaggle_vegetable", "kaggle_vegetable", "images", "KaggleVegetable",
                     "vegetable image classification", 15, OVERALL, "a photo of a {}, a type of vegetable."),
    BenchmarkDataset("plant_seedling", "PlantSeedlingV1", "Nonsegmented", "PlantSeedlingV1",
                     "plant seedling image classification", 12, OVERALL, "a photo of a {}, a type of seedling."),
    BenchmarkDataset("plant_village", "PlantVillage", "Plant_leave_diseases_dataset_without_augmentation",
                     "PlantVillage", "plant leaf disease classification", 39, OVERALL,
                     "a photo of a plant leaf with {} disease."),
)

GROUPS = {"general10": GENERAL10, "plant6": PLANT6}

# Fashion-20 zero-shot templates by task id (official code): the garment each attribute belongs to.
FASHION20_KINDS = ["pants"] * 3 + ["tops"] * 4 + ["shoes"] * 7 + ["hat"] + ["socks"] * 2 + ["skirt", "tops",
                                                                                               "underwear"]


def _task_name(ds: BenchmarkDataset, dataset_dir: Path, from_file: Optional[str]) -> str:
    if from_file:
        return from_file
    name_file = dataset_dir / "task_name.txt"
    return name_file.read_text().strip() if name_file.is_file() else ds.task_name


def _read_dataset(ds: BenchmarkDataset, root: Path, split_format: str) -> TaskSplits:
    dataset_dir = root / ds.dataset_dir
    if not dataset_dir.is_dir():
        raise DataError(f"dataset folder for {ds.key!r} not found: {dataset_dir}")
    if not ds.split_name:
        return read_fgvc_aircraft(dataset_dir)
    prefix = dataset_dir / ds.image_dir if ds.image_dir else dataset_dir
    dk, zhou = dataset_dir / f"split_dk_{ds.split_name}.json", dataset_dir / f"split_zhou_{ds.split_name}.json"
    candidates = {"auto": [dk, zhou], "split_dk": [dk], "split_zhou": [zhou]}[split_format]
    for path in candidates:
        if path.is_file():
            logger.info("%s: reading %s", ds.key, path)
            if path == zhou:
                return read_split_zhou(path, prefix)
            tasks = read_split_dk(path, prefix)
            if len(tasks) != 1:
                raise DataError(f"{path}: expected one task, the file has {len(tasks)}")
            return tasks[0]
    raise DataError(f"no split file for {ds.key!r}: expected {' or '.join(str(p) for p in candidates)}")


def _drop_classes(parts: TaskSplits, ignored: Tuple[str, ...]) -> TaskSplits:
    keep = [i for i, c in enumerate(parts.classnames) if c not in ignored]
    if len(keep) == len(parts.classnames):
        return parts
    new = {old: i for i, old in enumerate(keep)}
    splits = {s: [(p, new[y]) for p, y in items if y in new] for s, items in parts.splits.items()}
    return TaskSplits(splits, [parts.classnames[i] for i in keep], parts.task_name, parts.metric)


def official_fewshot_file(name: str, root: str | Path, key: str, shots: int, seed: int) -> Path:
    """The official few-shot file of task ``key`` of benchmark ``name``: ``<dataset>/split_fewshot_mt/``."""
    ds = next((d for d in GROUPS[name] if d.key == key), None)
    if ds is None:
        raise DataError(f"{name} has no task {key!r}")
    return Path(root) / ds.dataset_dir / "split_fewshot_mt" / f"shot_{shots}-seed_{seed}.pkl"


def read_benchmark(name: str, root: str | Path, split_format: str = "auto") -> MultiTaskData:
    """General-10 or Plant-6 from ``root`` (the folder holding the datasets' folders)."""
    if split_format not in choices(DataConfig, "split_format"):
        raise ConfigError(f"data.split_format={split_format!r} is not one of "
                          f"{list(choices(DataConfig, 'split_format'))}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    tasks, per_task, problems = [], [], []
    for ds in GROUPS[name]:
        parts = _drop_classes(_read_dataset(ds, root, split_format), ds.ignored)
        classes = tuple(clean_classname(ds.rename.get(c, c)) for c in parts.classnames)
        try:
            tasks.append(TaskSpec(ds.key, _task_name(ds, root / ds.dataset_dir, parts.task_name), classes,
                                  ds.metric, ds.template))
        except DataError as err:
            raise DataError(f"{ds.key} ({root / ds.dataset_dir}): {err}") from err
        if len(classes) != ds.num_classes:
            problems.append(f"{ds.key}: {len(classes)} classes, the paper's {name} has {ds.num_classes}")
        per_task.append(parts.splits)
    data = assemble(tasks, per_task, str(root))
    data.problems += problems
    return data


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def read_fashion20(root: str | Path) -> MultiTaskData:
    """Fashion-20: ``fashion20/{task_info.csv, images/<task id>/<class id>/*, split_dk_Fashion20.json}``."""
    base = Path(root) / "fashion20"
    if not base.is_dir():
        raise DataError(f"Fashion-20 folder not found: {base}")
    info = read_task_info(base / "task_info.csv")
    kinds = FASHION20_KINDS if len(info) == len(FASHION20_KINDS) else None
    tasks = []
    for t, (name, classes) in enumerate(info):
        template = f"a photo of {{}}, a type of {kinds[t]}." if kinds else "a photo of {}."
        try:
            tasks.append(TaskSpec(_slug(name), clean_classname(name), tuple(clean_classname(c) for c in classes),
                                  MEAN_PC, template))
        except DataError as err:
            raise DataError(f"{base / 'task_info.csv'} task {t}: {err}") from err
    images, split_file = base / "images", base / "split_dk_Fashion20.json"
    problems = []
    if split_file.is_file():
        # Class names from task_info.csv (as the official code); a meta block must agree with them.
        read = read_split_dk(split_file, images, [list(t.classnames) for t in tasks])
        per_task = [r.splits for r in read]
    else:
        per_task = [random_split(_scan_task_folder(images, t, task), f"fashion20:{t}") for t, task in enumerate(tasks)]
        problems.append(f"no {split_file.name}: made a deterministic per-class 50/20/30 split of {images}")
    data = assemble(tasks, per_task, str(base))
    data.problems += problems
    return data


def _scan_task_folder(images: Path, t: int, task: TaskSpec) -> List[Tuple[str, int]]:
    task_dir = images / str(t)
    if not task_dir.is_dir():
        raise DataError(f"image folder of task {t} ({task.key!r}) not found: {task_dir}")
    items = []
    for class_dir in sorted(p for p in task_dir.iterdir() if p.is_dir()):
        if not class_dir.name.isdigit() or int(class_dir.name) >= task.num_classes:
            raise DataError(f"class folder {class_dir} is not a class id of task {task.key!r} "
                            f"(0..{task.num_classes - 1})")
        items += [(str(f), int(class_dir.name)) for f in sorted(class_dir.iterdir())
                  if f.suffix.lower() in IMAGE_EXTENSIONS]
    return items


def read_split_dk_group(split_file: str | Path, root: str | Path) -> MultiTaskData:
    """Any multi-task split_dk file (``data.dataset=split_dk``): tasks, class names, task names and
    metrics from its meta block, image paths relative to ``root``."""
    if split_file is None:
        raise ConfigError("data.dataset=split_dk needs data.group_file (the split_dk_*.json file)")
    split_file, root = Path(split_file), Path(root)
    read = read_split_dk(split_file, root)
    tasks = []
    for t, r in enumerate(read):
        name = r.task_name or f"task {t}"
        try:
            tasks.append(TaskSpec(_slug(name) or f"task{t}", clean_classname(name),
                                  tuple(clean_classname(c) for c in r.classnames), r.metric or OVERALL))
        except DataError as err:
            raise DataError(f"{split_file} task {t}: {err}") from err
    return assemble(tasks, [r.splits for r in read], str(split_file))
