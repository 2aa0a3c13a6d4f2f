"""The micro world's few-shot group (``data.dataset=micro``): one task per learnt attribute, as image files.

Each image is a scene with the task's attribute set to the class and every other attribute drawn at
random among the combinations pre-training held out (``softcpt_dist.micro.world.held_out``): the group
is a downstream domain that the micro CLIP never saw, few-shot training images included, as benchmark
images are for real CLIP. They are also taken with another camera (``data.micro.zoom``, ``colour_gain``):
a consistent shift that zero-shot prompts cannot know and a few labelled shots reveal. Written as PNG
files in the ``task_folders`` layout, so every reader path, the feature cache and ``data check`` treat it
like user data.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from PIL import Image

from softcpt_dist.data.loading import GeneratedDataset
from softcpt_dist.data.task_folders import MANIFEST, SPLITS, write_task_manifest
from softcpt_dist.data.tasks import DataError, TaskSpec
from softcpt_dist.files import atomic_write_text
from softcpt_dist.config import MicroGroupConfig
from softcpt_dist.micro.world import ATTRIBUTES, WORLD_VERSION, Camera, render_batch, sample_scene

logger = logging.getLogger(__name__)
GROUP_VERSION = 3  # bump when the group's tasks or sampling change
STAMP = "micro_group.json"  # what the folder was generated with; a mismatch is refused, never overwritten

# Task names and zero-shot templates in the captions' own words. Shape is not a task: captions never name
# it (``world.MENTION``), so it varies as a nuisance only.
TASKS = (
    TaskSpec("colour", "object colour", ATTRIBUTES["colour"], "accuracy", "a photo of a {} object."),
    TaskSpec("size", "object size", ATTRIBUTES["size"], "accuracy", "a photo of a {} object."),
    TaskSpec("count", "number of objects", ATTRIBUTES["count"], "accuracy", "a photo of {} objects."),
    TaskSpec("position", "object position", ATTRIBUTES["position"], "accuracy", "a photo of an object at the {}."),
    TaskSpec("background", "background colour", ATTRIBUTES["background"], "accuracy", "a photo on a {} background."),
    TaskSpec("pattern", "background pattern", ATTRIBUTES["pattern"], "accuracy", "a photo on a {} background."),
)


def _stamp(cfg: MicroGroupConfig) -> dict:
    return {"world_version": WORLD_VERSION, "group_version": GROUP_VERSION, "seed": cfg.seed,
            "train_per_class": cfg.train_per_class,
            "val_per_class": cfg.val_per_class, "test_per_class": cfg.test_per_class,
            "zoom": cfg.zoom, "colour_gain": list(cfg.colour_gain)}


def check_group(root: Path, cfg: MicroGroupConfig) -> bool:
    """True if ``root`` holds the group of ``cfg``, False if it holds nothing; an error if something else."""
    stamp_file = root / STAMP
    if not (root / MANIFEST).is_file():
        return False
    if not stamp_file.is_file():
        raise DataError(f"data.root={root} holds a dataset that is not a micro group ({STAMP} missing); "
                        "set data.root to another folder for data.dataset=micro")
    found = json.loads(stamp_file.read_text())
    if found != _stamp(cfg):
        raise DataError(f"data.root={root} holds a micro group made with {found}, not the configured {_stamp(cfg)}; "
                        "set data.root to another folder, or remove that one (it is generated: the next run writes "
                        "it anew; runs made on it keep their results)")
    return True


def write_group(root: str | Path, cfg: MicroGroupConfig = MicroGroupConfig()) -> Path:
    """Write the group under ``root`` (deterministic in ``cfg``) unless it is there; returns ``root``."""
    root = Path(root)
    if check_group(root, cfg):
        return root
    camera = Camera(cfg.zoom, tuple(cfg.colour_gain))
    per_split = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}
    for split in SPLITS:
        for task in TASKS:
            for label in range(task.num_classes):
                folder = root / split / task.key / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                key = f"{cfg.seed}:group:{split}:{task.key}:{label}"
                rng = random.Random(key)
                scenes = [sample_scene(rng, novel=True, fixed={task.key: label}) for _ in range(per_split[split])]
                images = render_batch(scenes, [f"{key}:{n}" for n in range(len(scenes))], camera=camera)
                for n, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
                    Image.fromarray(image).save(folder / f"{n:04d}.png")
    atomic_write_text(root / STAMP, json.dumps(_stamp(cfg), indent=2))
    write_task_manifest(root, TASKS)  # last: marks a complete group
    logger.info("wrote the micro group (%d tasks) to %s", len(TASKS), root)
    return root


# data.dataset=micro (declared in pyproject.toml's softcpt_dist.datasets entry points)
DATASET = GeneratedDataset(lambda root, cfg: check_group(root, cfg.micro), lambda root, cfg: write_group(root, cfg.micro))
