"""The built-in dataset: a small multi-task group of generated images, written as real JPEG files.

Four related tasks over the same kind of picture (coloured shapes on a patterned grey background),
each image labelled for one task: the colour and size of the object, the background's brightness
and pattern. Tasks have different class counts (5, 3, 2, 3) on purpose.
It lets the default job run end to end with no downloads, and gives tests real files. It is
written in the ``task_folders`` layout (``softcpt_dist.data.task_folders``).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from softcpt_dist.config import SyntheticDataConfig
from softcpt_dist.data.task_folders import SPLITS, write_task_manifest
from softcpt_dist.data.tasks import TaskSpec

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20),
           "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle", "cross")
PATTERNS = ("plain", "striped", "checkered")
TONES = {"light": (200, 235), "medium": (140, 170), "dark": (70, 100)}
SIZES = ("small", "large")
_RADIUS = {"small": (0.10, 0.13), "large": (0.24, 0.30)}  # fraction of the image side

TASKS = (
    TaskSpec("colour", "colour of the object", tuple(COLOURS), "mean_per_class_accuracy", "a photo of a {} object."),
    TaskSpec("tone", "brightness of the background", tuple(TONES), "accuracy", "a photo with a {} background."),
    TaskSpec("size", "size of the object", SIZES, "accuracy", "a photo of a {} object."),
    TaskSpec("pattern", "background pattern", PATTERNS, "accuracy", "a {} background."),
)


def _draw(rng: random.Random, size: int, shape: str, colour: str, pattern: str, tone: str,
          scale: str) -> Image.Image:
    grey = rng.randint(*TONES[tone])
    shade = grey - rng.randint(40, 60) if grey > 128 else grey + rng.randint(40, 60)
    bg_a, bg_b = (grey,) * 3, (shade,) * 3
    img = Image.new("RGB", (size, size), bg_a)
    draw = ImageDraw.Draw(img)
    period = size // 8
    if pattern == "striped":
        for y in range(0, size, 2 * period):
            draw.rectangle([0, y, size, y + period - 1], fill=bg_b)
    elif pattern == "checkered":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=bg_b)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    r = rng.uniform(*_RADIUS[scale]) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    _draw_shape(draw, rng, shape, cx, cy, r, fill)
    return img


def _draw_shape(draw, rng, shape, cx, cy, r, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        draw.polygon([(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3))
                      for k in range(3)], fill=fill)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def generate_synthetic(root: str | Path, cfg: SyntheticDataConfig = SyntheticDataConfig()) -> Path:
    """Write the built-in dataset under ``root`` (deterministic in ``cfg.seed``)."""
    root = Path(root)
    per_split = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}
    for split in SPLITS:
        for t_idx, task in enumerate(TASKS):
            for c_idx, cls in enumerate(task.classnames):
                folder = root / split / task.key / str(c_idx)
                folder.mkdir(parents=True, exist_ok=True)
                rng = random.Random(f"{cfg.seed}:{split}:{task.key}:{cls}")
                for n in range(per_split[split]):
                    attrs = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                             "pattern": rng.choice(PATTERNS), "tone": rng.choice(list(TONES)), "scale": rng.choice(SIZES)}
                    attrs["scale" if task.key == "size" else task.key] = cls
                    _draw(rng, cfg.image_size, **attrs).save(folder / f"{n:04d}.jpg", quality=92)
    write_task_manifest(root, TASKS)
    logger.info("generated the built-in dataset at %s", root)
    return root
