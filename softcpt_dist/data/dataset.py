"""Multi-task image samples and the torch Dataset that reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from softcpt_dist.data.tasks import DataError, TaskGroup


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

    def check(self) -> None:
        for split, samples in self.splits.items():
            for s in samples:
                if not 0 <= s.task < len(self.group):
                    raise DataError(f"{split}: {s.path} has task index {s.task} outside the group")
                n = self.group.tasks[s.task].num_classes
                if not 0 <= s.label < n:
                    raise DataError(f"{split}: {s.path} has label {s.label}, task "
                                    f"{self.group.tasks[s.task].key!r} has {n} classes")

    def counts(self, split: str) -> List[List[int]]:
        out = [[0] * t.num_classes for t in self.group.tasks]
        for s in self.splits[split]:
            out[s.task][s.label] += 1
        return out


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
    """Items ``(image, task, label, index)``; ``index`` lets callers match cached features."""

    def __init__(self, samples: List[Sample], transform: Optional[Callable] = None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = load_image(s.path)
        if self.transform is not None:
            img = self.transform(img)
        return img, s.task, s.label, i
