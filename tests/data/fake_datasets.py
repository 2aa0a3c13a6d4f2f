"""Small on-disk copies of the benchmark layouts (real JPEG files, a few per class) for the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from PIL import Image

from softcpt_dist.data.paper_groups import GENERAL10, PLANT6


def write_image(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)).save(path)
    return str(path)


# Raw class names per dataset, as the split files hold them (CoOp renames some after loading).
RAW_CLASSES: Dict[str, List[str]] = {
    "caltech101": ["airplanes", "Faces_easy", "brain", "Leopards"],
    "eurosat": ["AnnualCrop", "SeaLake", "Forest"],
    "ucf101": ["Apply_Eye_Makeup", "Band_Marching", "Biking"],
    "fgvc_aircraft": ["707-320", "A300B4", "Cessna 172"],
}
PER_SPLIT = {"train": 3, "val": 1, "test": 2}


def _classes(key: str) -> List[str]:
    return RAW_CLASSES.get(key, [f"{key}_class_{i}" for i in range(3)])


def make_coop_root(root: Path, split_dk: bool = False) -> Path:
    """General-10 (and, with ``split_dk``, Plant-6) folders with CoOp split_zhou or SoftCPT split_dk files."""
    datasets = GENERAL10 + (PLANT6 if split_dk else ())
    for ds in datasets:
        ddir = root / ds.dataset_dir
        prefix = ddir / ds.image_dir if ds.image_dir else ddir
        classes = _classes(ds.key)
        entries = {s: [] for s in PER_SPLIT}
        n = 0
        for split, count in PER_SPLIT.items():
            for label, cname in enumerate(classes):
                for i in range(count):
                    rel = f"{cname.replace(' ', '-')}/{split}_{i}.jpg"
                    if ds.key == "fgvc_aircraft":
                        rel = f"{1000 + n}.jpg"
                    write_image(prefix / rel, n)
                    n += 1
                    if ds.key == "fgvc_aircraft":
                        entries[split].append(f"{rel[:-4]} {cname}")
                    elif split_dk:
                        entries[split].append([rel, [label], [0]])
                    else:
                        entries[split].append([rel, label, cname])
        if ds.key == "fgvc_aircraft":
            (ddir / "variants.txt").write_text("\n".join(classes) + "\n")
            for split, lines in entries.items():
                (ddir / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
            continue
        if split_dk:
            meta = {"taskid2cname": [classes], "taskid2tname": [f"{ds.key} official task"],
                    "taskid2metric": ["overall_acc"], "taskid2desc": ["d"], "taskid2type": ["sl"]}
            (ddir / f"split_dk_{ds.split_name}.json").write_text(json.dumps({**entries, "meta": meta}))
        else:
            (ddir / f"split_zhou_{ds.split_name}.json").write_text(json.dumps(entries))
    return root


FASHION_TASKS = [("pants type", ["jeans", "shorts"]), ("shoe colour", ["black", "white", "red"])]


def make_fashion20(root: Path, with_split: bool = True, tasks=FASHION_TASKS) -> Path:
    base = root / "fashion20"
    rows = ["task_id\ttask_name\ttask_desc\tlabel_name"]
    entries = {s: [] for s in PER_SPLIT}
    n = 0
    for t, (name, classes) in enumerate(tasks):
        rows.append(f"{t}\t{name}\tclassify {name}\t{', '.join(classes)}")
        for c in range(len(classes)):
            for split, count in PER_SPLIT.items():
                for i in range(count + 1):
                    rel = f"{t}/{c}/{split}_{i}.jpg"
                    write_image(base / "images" / rel, n)
                    n += 1
                    entries[split].append([rel, [c], [t]])
    (base / "task_info.csv").write_text("\n".join(rows) + "\n")
    if with_split:
        meta = {"taskid2cname": [c for _, c in tasks]}
        (base / "split_dk_Fashion20.json").write_text(json.dumps({**entries, "meta": meta}))
    return root
