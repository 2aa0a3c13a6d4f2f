"""Multi-task image samples and the torch Dataset that reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from softcpt_dist.data.tasks import DataError, TaskGroup, TaskSpec
from softcpt_dist.seeding import seeded_call


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class Sample:
    path: str
    task: int  # index into the task group
    label: int  # class index within the task


@dataclass
class MultiTaskData:
    """A task group and its splits (``train``/``val``/``test`` lists of samples)."""

    group: TaskGroup
    splits: Dict[str, List[Sample]]
    problems: List[str] = field(default_factory=list)  # non-fatal findings, reported by load and `data check`
    report: Dict = field(default_factory=dict)  # few-shot record (load_data), saved next to the run

    def check(self) -> None:
        for split, samples in self.splits.items():
            for s in samples:
                if not 0 <= s.task < len(self.group):
                    raise DataError(f"{split}: {s.path} has task index {s.task} outside the group")
                n = self.group.tasks[s.task].num_classes
                if not 0 <= s.label < n:
                    raise DataError(f"{split}: {s.path} has label {s.label}, task "
                                    f"{self.group.tasks[s.task].key!r} has {n} classes")

    def select_tasks(self, names: Sequence[str]) -> "MultiTaskData":
        """Only the named tasks (keys or names), in the given order, with task indices renumbered."""
        indices = [self.group.index(n) for n in names]
        if len(set(indices)) != len(indices):
            raise DataError(f"data.tasks names a task twice: {list(names)}")
        local = {t: i for i, t in enumerate(indices)}
        splits = {k: [Sample(s.path, local[s.task], s.label) for s in v if s.task in local]
                  for k, v in self.splits.items()}
        return MultiTaskData(self.group.subset(indices), splits, list(self.problems))

    def counts(self, split: str) -> List[List[int]]:
        out = [[0] * t.num_classes for t in self.group.tasks]
        for s in self.splits[split]:
            out[s.task][s.label] += 1
        return out


def assemble(tasks: Sequence[TaskSpec], per_task: Sequence[Dict[str, List[Tuple[str, int]]]],
             where: str, required: Sequence[str] = ("train", "test")) -> MultiTaskData:
    """Tasks plus each task's ``{split: [(path, label), ...]}`` into one checked ``MultiTaskData``.

    A task without samples in a required split is an error naming the task and ``where`` (the
    file or folder it was read from); a missing optional split (``val``) is an empty list.
    """
    splits: Dict[str, List[Sample]] = {"train": [], "val": [], "test": []}
    for t, (task, parts) in enumerate(zip(tasks, per_task)):
        for split in splits:
            items = parts.get(split, [])
            if not items and split in required:
                raise DataError(f"task {task.key!r} has no {split} images ({where})")
            for path, label in items:
                if not 0 <= label < task.num_classes:
                    raise DataError(f"{where}: {path} has label {label}, task {task.key!r} has "
                                    f"{task.num_classes} classes")
                splits[split].append(Sample(str(path), t, int(label)))
    return MultiTaskData(TaskGroup(list(tasks)), splits)


def load_image(path: str) -> Image.Image:
    """Open an image as RGB; a missing or corrupt file is an error naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot decode image file {path}: {err}") from err


class MultiTaskImageDataset(Dataset):
    """Items ``(image, task, label, index)``; ``index`` lets callers match cached features.

    With ``seed``, the transform of item ``i`` in epoch ``e`` is seeded by (seed, e, i) (call
    ``set_epoch``), so a resumed run augments exactly as an uninterrupted one.
    """

    def __init__(self, samples: List[Sample], transform: Optional[Callable] = None, seed: Optional[int] = None):
        self.samples = samples
        self.transform = transform
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = load_image(s.path)
        if self.transform is not None:
            if self.seed is None:
                img = self.transform(img)
            else:
                img = seeded_call(lambda: self.transform(img), "augment", self.seed, self.epoch, i)
        return img, s.task, s.label, i
