"""Task groups for the text-side benchmarks: Plant-6 with its real class names, General-10's shape, a
generated group of 100 tasks x 100 classes (``large_group``); and
either as a ``task_folders`` dataset of noise images (``write_folders``), for profiling without the datasets.

Plant-6's six datasets and their classes (cleaned the way the readers clean folder names). For
General-10 (1,191 classes) the names are made up, with each dataset's class count and a spread of
name lengths like its real names (from one-word textures to long car model names).
"""

from __future__ import annotations

import random
from pathlib import Path

from softcpt_dist.data.paper_groups import GENERAL10, PLANT6
from softcpt_dist.data.tasks import TaskGroup, TaskSpec

PLANT6_CLASSES = {
    "fruit_vegetable": "apple banana beetroot bell_pepper cabbage capsicum carrot cauliflower chilli_pepper corn "
                       "cucumber eggplant garlic ginger grapes jalepeno kiwi lemon lettuce mango onion orange paprika "
                       "pear peas pineapple pomegranate potato raddish soy_beans spinach sweetcorn sweetpotato tomato "
                       "turnip watermelon",
    "kaggle_flower": "daisy dandelion rose sunflower tulip",
    "kaggle_mushroom": "Agaricus Amanita Boletus Cortinarius Entoloma Hygrocybe Lactarius Russula Suillus",
    "kaggle_vegetable": "Bean Bitter_Gourd Bottle_Gourd Brinjal Broccoli Cabbage Capsicum Carrot Cauliflower "
                        "Cucumber Papaya Potato Pumpkin Radish Tomato",
    "plant_seedling": "Black-grass Charlock Cleavers Common_Chickweed Common_wheat Fat_Hen Loose_Silky-bent Maize "
                      "Scentless_Mayweed Shepherds_Purse Small-flowered_Cranesbill Sugar_beet",
    "plant_village": "Apple_scab Apple_black_rot Apple_cedar_apple_rust Apple_healthy Background_without_leaves "
                     "Blueberry_healthy Cherry_powdery_mildew Cherry_healthy Corn_cercospora_leaf_spot_gray_leaf_spot "
                     "Corn_common_rust Corn_northern_leaf_blight Corn_healthy Grape_black_rot "
                     "Grape_esca_(black_measles) Grape_leaf_blight_(isariopsis_leaf_spot) Grape_healthy "
                     "Orange_haunglongbing_(citrus_greening) Peach_bacterial_spot Peach_healthy "
                     "Pepper_bell_bacterial_spot Pepper_bell_healthy Potato_early_blight Potato_late_blight "
                     "Potato_healthy Raspberry_healthy Soybean_healthy Squash_powdery_mildew Strawberry_leaf_scorch "
                     "Strawberry_healthy Tomato_bacterial_spot Tomato_early_blight Tomato_late_blight "
                     "Tomato_leaf_mold Tomato_septoria_leaf_spot Tomato_spider_mites_two-spotted_spider_mite "
                     "Tomato_target_spot Tomato_yellow_leaf_curl_virus Tomato_mosaic_virus Tomato_healthy",
}
# Words per General-10 class name (min, max), like the real names: "2012 BMW M3 coupe", "Apply Eye Makeup".
GENERAL10_WORDS = {"caltech101": (1, 2), "dtd": (1, 1), "eurosat": (1, 4), "fgvc_aircraft": (1, 3),
                   "food101": (1, 3), "oxford_flowers": (1, 4), "oxford_pets": (1, 3), "stanford_cars": (3, 7),
                   "sun397": (1, 4), "ucf101": (1, 4)}
_SYLLABLES = ("ka", "lo", "mi", "ra", "su", "te", "vo", "ni", "pa", "do", "re", "zu", "qui", "bar", "ton")


def plant6() -> TaskGroup:
    tasks = []
    for ds in PLANT6:
        names = [n.replace("_", " ") for n in PLANT6_CLASSES[ds.key].split()]
        assert len(names) == ds.num_classes, (ds.key, len(names))
        tasks.append(TaskSpec(ds.key, ds.task_name, tuple(names), ds.metric, ds.template))
    return TaskGroup(tasks)


def general10(seed: int = 0) -> TaskGroup:
    rng, tasks = random.Random(seed), []
    for ds in GENERAL10:
        low, high = GENERAL10_WORDS[ds.key]
        names = []
        while len(names) < ds.num_classes:
            words = [("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))) for _ in
                     range(rng.randint(low, high))]
            name = " ".join(words)
            if name not in names:
                names.append(name)
        tasks.append(TaskSpec(ds.key, ds.task_name, tuple(names), ds.metric, ds.template))
    return TaskGroup(tasks)


def clip_words() -> list:
    """A word list: the whole-word entries of CLIP's BPE vocabulary (alphabetic, 3+ letters), in its order."""
    import softcpt_dist  # noqa: F401  (the torchvision shim before open_clip)
    import open_clip

    encoder = open_clip.get_tokenizer("ViT-B-16").encoder
    return [w[:-4] for w in encoder if w.endswith("</w>") and w[:-4].isalpha() and len(w) >= 7]


def large_group(tasks: int = 100, classes: int = 100, seed: int = 0) -> TaskGroup:
    """A generated group of ``tasks`` tasks of ``classes`` classes each (shapes only): task names of one word
    and class names of one to three words drawn from ``clip_words``, distinct within each task."""
    rng, words = random.Random(seed), clip_words()
    specs = []
    for t in range(tasks):
        names = []
        while len(names) < classes:
            name = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
            if name not in names:
                names.append(name)
        specs.append(TaskSpec(f"task{t:03d}", rng.choice(words), tuple(names), "accuracy", "a photo of a {}."))
    return TaskGroup(specs)


GROUPS = {"plant6": plant6, "general10": general10, "large100": large_group}


def write_folders(group: TaskGroup, root: Path, per_class: int = 2, size: int = 32) -> Path:
    """A ``task_folders`` dataset of ``group``'s tasks and class names (plain noise images): ``per_class``
    training images per class, one validation and one test image."""
    import numpy as np
    from PIL import Image

    from softcpt_dist.data.task_folders import write_task_manifest
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1), ("test", 1)):
        for task in group.tasks:
            for c in range(task.num_classes):
                folder = root / split / task.key / str(c)
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    write_task_manifest(root, group.tasks)
    return root


if __name__ == "__main__":  # python benchmarks/group_shapes.py general10 OUT_DIR [PER_CLASS]
    import sys

    write_folders(GROUPS[sys.argv[1]](), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    print(f"wrote {sys.argv[1]}'s shape to {sys.argv[2]}")
