"""Benchmark readers, custom groups, few-shot subsets and bad-input errors, on small real trees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_datasets import PER_SPLIT, make_coop_root, make_fashion20, write_image

from softcpt_dist.cli import main
from softcpt_dist.config import ConfigError, DataConfig, load_config
from softcpt_dist.data import load_data, read_dataset
from softcpt_dist.data.paper_groups import GENERAL10, PLANT6
from softcpt_dist.data.dataset import MultiTaskImageDataset
from softcpt_dist.data.tasks import DataError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory):
    return make_coop_root(tmp_path_factory.mktemp("coop"))


@pytest.fixture(scope="module")
def dk_root(tmp_path_factory):
    return make_coop_root(tmp_path_factory.mktemp("dk"), split_dk=True)


def _counts(data, split):
    return [sum(c) for c in data.counts(split)]


def test_general10_from_coop_split_zhou(coop_root):
    data = read_dataset(DataConfig(dataset="general10", root=str(coop_root)))
    group = data.group
    assert [t.key for t in group.tasks] == [d.key for d in GENERAL10]
    caltech = group.tasks[0]
    # CoOp clean-up: ignored classes dropped, NEW_CNAMES applied, labels renumbered.
    assert caltech.classnames == ("airplane", "brain", "leopard")
    assert group.tasks[group.index("eurosat")].classnames == ("Annual Crop Land", "Sea or Lake", "Forest")
    assert group.tasks[group.index("ucf101")].classnames == ("Apply Eye Makeup", "Band Marching", "Biking")
    assert group.tasks[group.index("fgvc_aircraft")].classnames == ("707-320", "A300B4", "Cessna 172")
    assert group.tasks[group.index("dtd")].template == "{} texture."
    assert caltech.metric == "mean_per_class_accuracy" and group.tasks[1].metric == "accuracy"
    for split, k in PER_SPLIT.items():
        assert _counts(data, split) == [3 * k] * 10
        assert all(os.path.isfile(s.path) for s in data.splits[split])
    brain = [s for s in data.splits["train"] if s.task == 0 and s.label == 1]
    assert brain and all("/brain/" in s.path for s in brain)
    cars = [s for s in data.splits["test"] if s.task == group.index("stanford_cars")]
    assert all(Path(s.path).parent.parent.name == "stanford_cars" for s in cars)  # prefix is dataset_dir
    assert any("caltech101: 3 classes, the paper's general10 has 100" in p for p in data.problems)


def test_split_dk_preferred_and_forced_format(dk_root):
    data = read_dataset(DataConfig(dataset="general10", root=str(dk_root)))
    assert data.group.tasks[1].name == "dtd official task"  # meta.taskid2tname
    with pytest.raises(DataError, match="no split file for 'caltech101'.*split_zhou_Caltech101.json"):
        read_dataset(DataConfig(dataset="general10", root=str(dk_root), split_format="split_zhou"))
    plant = read_dataset(DataConfig(dataset="plant6", root=str(dk_root)))
    assert [t.key for t in plant.group.tasks] == [d.key for d in PLANT6]
    assert plant.group.num_classes == 18 and _counts(plant, "test") == [6] * 6


def test_task_name_file_used_without_meta(coop_root):
    (coop_root / "oxford_pets" / "task_name.txt").write_text("pet breed classification\n")
    data = read_dataset(DataConfig(dataset="general10", root=str(coop_root)))
    assert data.group.tasks[data.group.index("oxford_pets")].name == "pet breed classification"


def test_fashion20_with_and_without_split_file(tmp_path):
    make_fashion20(tmp_path)
    data = read_dataset(DataConfig(dataset="fashion20", root=str(tmp_path)))
    assert [t.name for t in data.group.tasks] == ["pants type", "shoe colour"]
    assert data.group.tasks[1].classnames == ("black", "white", "red")
    assert data.group.tasks[0].key == "pants_type" and data.group.tasks[0].metric == "mean_per_class_accuracy"
    assert _counts(data, "train") == [8, 12] and not data.problems
    (tmp_path / "fashion20" / "split_dk_Fashion20.json").unlink()
    made = read_dataset(DataConfig(dataset="fashion20", root=str(tmp_path)))
    again = read_dataset(DataConfig(dataset="fashion20", root=str(tmp_path)))
    assert made.splits == again.splits and "deterministic per-class 50/20/30 split" in made.problems[0]
    assert sum(len(v) for v in made.splits.values()) == 5 * 9  # 9 images per class


def test_split_dk_multitask_group(tmp_path):
    entries = {s: [] for s in PER_SPLIT}
    for t, n_cls in enumerate((2, 3)):
        for split, k in PER_SPLIT.items():
            for c in range(n_cls):
                for i in range(k):
                    rel = f"t{t}/c{c}/{split}{i}.png"
                    write_image(tmp_path / rel, i)
                    entries[split].append([rel, [c], [t]])
    meta = {"taskid2cname": [["cat_face", "dog"], ["a", "b", "c"]], "taskid2tname": ["pet kind", "letters"],
            "taskid2metric": ["mean_acc", "overall_acc"]}
    (tmp_path / "split_dk_mine.json").write_text(json.dumps({**entries, "meta": meta}))
    data = read_dataset(DataConfig(dataset="split_dk", root=str(tmp_path), group_file=str(tmp_path / "split_dk_mine.json")))
    assert [t.key for t in data.group.tasks] == ["pet_kind", "letters"]
    assert data.group.tasks[0].classnames == ("cat face", "dog")
    assert [t.metric for t in data.group.tasks] == ["mean_per_class_accuracy", "accuracy"]
    assert _counts(data, "train") == [6, 9]


def _custom_tree(root: Path) -> Path:
    for split, k in PER_SPLIT.items():
        for cls in ("sea_lake", "forest"):
            for i in range(k):
                write_image(root / "sat" / split / cls / f"{i}.jpg", i)
    rows = {s: ["path,label"] for s in PER_SPLIT}
    for split, k in PER_SPLIT.items():
        for c, cls in enumerate(("beach", "harbor", "runway")):
            for i in range(k):
                write_image(root / "ucm" / "img" / f"{cls}{split}{i}.png", i)
                rows[split].append(f"{cls}{split}{i}.png,{cls if i % 2 else c}")  # by name or index
    for split, lines in rows.items():
        (root / "ucm" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    group = {"name": "rs", "tasks": [
        {"key": "sat", "name": "land use", "image_folder": "sat", "template": "a satellite photo of {}."},
        {"key": "ucm", "name": "aerial scene", "classes": ["beach", "harbor", "runway"],
         "csv": {s: f"ucm/{s}.csv" for s in PER_SPLIT}, "image_root": "ucm/img"}]}
    (root / "group.json").write_text(json.dumps(group))  # JSON is YAML
    return root / "group.json"


def test_custom_group_folders_and_csv(tmp_path):
    group_file = _custom_tree(tmp_path)
    data = read_dataset(DataConfig(dataset="custom", root=str(tmp_path), group_file=str(group_file)))
    sat, ucm = data.group.tasks
    assert sat.classnames == ("forest", "sea lake") and ucm.classnames == ("beach", "harbor", "runway")
    assert _counts(data, "train") == [6, 9] and _counts(data, "val") == [2, 3]
    assert data.counts("test")[1] == [2, 2, 2]
    only = read_dataset(DataConfig(dataset="custom", root=str(tmp_path), group_file=str(group_file), tasks=["aerial scene"]))
    assert [t.key for t in only.group.tasks] == ["ucm"] and all(s.task == 0 for s in only.splits["train"])


# --- few-shot subsets -------------------------------------------------------------------------

_FEWSHOT_SCRIPT = """
import json, sys
import softcpt_dist
from softcpt_dist.config import DataConfig
from softcpt_dist.data import load_data
d = load_data(DataConfig(dataset="general10", root=sys.argv[1], shots=2), int(sys.argv[2]))
print(json.dumps([d.report["train"], d.report["val"]]))
"""


@pytest.mark.slow
def test_fewshot_identical_across_processes_and_seed_dependent(coop_root):
    def subset(seed):
        out = subprocess.run([sys.executable, "-c", _FEWSHOT_SCRIPT, str(coop_root), str(seed)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(seed + 7)})
        return json.loads(out.stdout.strip().splitlines()[-1])
    first, second, other = subset(1), subset(1), subset(2)
    assert first == second and first != other
    train, val = first
    assert len(train) == 10 * 3 * 2 and len(val) == 10 * 3 * 1  # K=2; val min(K, 4) capped by the 1 available


def test_fewshot_short_classes_reported_and_saved(small_data_root, tmp_path):
    cfg = load_config([], [f"data.root={small_data_root}", "data.shots=8", "method.name=zeroshot",
                           f"train.output_dir={tmp_path}", "train.run_name=fs", "train.progress=false"])
    data = load_data(cfg.data, cfg.train.seed)
    assert {(c["split"], c["available"], c["wanted"]) for c in data.report["short_classes"]} == {("train", 6, 8),
                                                                                                 ("val", 2, 4)}
    assert main(["train", f"data.root={small_data_root}", "data.shots=8", "method.name=zeroshot",
                 f"train.output_dir={tmp_path}", "train.run_name=fs", "train.progress=false",
                 "model.pretrained=null"]) == 0
    record = json.loads((tmp_path / "fs" / "fewshot_split.json").read_text())
    assert record["shots"] == 8 and record["val_shots"] == 4 and len(record["train"]) == 13 * 6


# --- bad input --------------------------------------------------------------------------------

def test_missing_root_and_split_file(tmp_path, coop_root):
    with pytest.raises(DataError, match="data root not found"):
        read_dataset(DataConfig(dataset="general10", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="dataset folder for 'caltech101' not found"):
        read_dataset(DataConfig(dataset="general10", root=str(tmp_path)))
    (tmp_path / "fashion20").mkdir()
    with pytest.raises(DataError, match="task_info.csv"):
        read_dataset(DataConfig(dataset="fashion20", root=str(tmp_path)))
    (tmp_path / "fruit_vegetable").mkdir()
    with pytest.raises(DataError, match="no split file for 'fruit_vegetable'.*split_dk_FruitVegetable.json"):
        read_dataset(DataConfig(dataset="plant6", root=str(tmp_path), split_format="split_dk"))


def test_listed_image_missing_is_named(tmp_path):
    make_coop_root(tmp_path)
    victim = tmp_path / "dtd" / "images" / "dtd_class_1" / "test_0.jpg"
    victim.unlink()
    with pytest.raises(DataError, match=f"not found, e.g. {victim}"):
        load_data(DataConfig(dataset="general10", root=str(tmp_path), shots=1), 1)


def test_corrupt_and_truncated_images(tmp_path):
    make_coop_root(tmp_path)
    corrupt = tmp_path / "dtd" / "images" / "dtd_class_0" / "test_1.jpg"
    corrupt.write_bytes(b"not an image at all")
    truncated = tmp_path / "eurosat" / "2750" / "Forest" / "test_0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path in (corrupt, truncated):
        with pytest.raises(DataError, match=f"cannot decode image file {path}"):
            MultiTaskImageDataset([type("S", (), {"path": str(path)})()])[0]
    cfg = DataConfig(dataset="general10", root=str(tmp_path), shots=1, skip_bad_images=True)
    data = load_data(cfg, 1)
    assert {r["path"] for r in data.report["skipped_images"]} == {str(corrupt), str(truncated)}
    assert not {str(corrupt), str(truncated)} & {s.path for s in data.splits["test"]}


def test_unknown_task_and_class_names(tmp_path, coop_root):
    with pytest.raises(DataError, match="unknown task 'imagenet'"):
        read_dataset(DataConfig(dataset="general10", root=str(coop_root), tasks=["dtd", "imagenet"]))
    group_file = _custom_tree(tmp_path)
    (tmp_path / "ucm" / "val.csv").write_text("path,label\nbeachval0.png,volcano\n")
    with pytest.raises(DataError, match=r"val.csv:2: unknown class 'volcano'"):
        read_dataset(DataConfig(dataset="custom", root=str(tmp_path), group_file=str(group_file)))
    write_image(tmp_path / "sat" / "train" / "desert" / "0.jpg", 0)
    spec = json.loads(group_file.read_text())
    spec["tasks"][0]["classes"] = ["forest", "sea lake"]
    spec["tasks"] = spec["tasks"][:1]
    group_file.write_text(json.dumps(spec))
    with pytest.raises(DataError, match="class folder .*desert is not one of its classes"):
        read_dataset(DataConfig(dataset="custom", root=str(tmp_path), group_file=str(group_file)))


def test_unknown_task_id_and_label_out_of_range_in_split_dk(tmp_path):
    write_image(tmp_path / "a.jpg", 0)
    meta = {"taskid2cname": [["x", "y"]]}
    for entry, message in (([["a.jpg", [0], [3]]], "unknown task id 3"), ([["a.jpg", [5], [0]]], "label 5 out of range")):
        (tmp_path / "s.json").write_text(json.dumps({"train": entry, "val": [], "test": entry, "meta": meta}))
        with pytest.raises(DataError, match=message):
            read_dataset(DataConfig(dataset="split_dk", root=str(tmp_path), group_file=str(tmp_path / "s.json")))


def test_duplicate_class_names_and_empty_task(tmp_path):
    group_file = _custom_tree(tmp_path)
    spec = json.loads(group_file.read_text())
    spec["tasks"][1]["classes"] = ["beach", "harbor", "beach"]
    group_file.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"task 'ucm'.*duplicate class names: \['beach'\]"):
        read_dataset(DataConfig(dataset="custom", root=str(tmp_path), group_file=str(group_file)))
    spec["tasks"][1]["classes"] = ["beach", "harbor", "runway"]
    group_file.write_text(json.dumps(spec))
    (tmp_path / "ucm" / "train.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="task 'ucm' has no train images"):
        read_dataset(DataConfig(dataset="custom", root=str(tmp_path), group_file=str(group_file)))


def test_split_zhou_label_conflict_and_bad_entries(tmp_path):
    make_coop_root(tmp_path)
    path = tmp_path / "food-101" / "split_zhou_Food101.json"
    entries = json.loads(path.read_text())
    entries["test"][0][2] = "pizza"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="label 0 is named both"):
        read_dataset(DataConfig(dataset="general10", root=str(tmp_path)))
    path.write_text("{ not json")
    with pytest.raises(DataError, match="split_zhou_Food101.json is not valid JSON"):
        read_dataset(DataConfig(dataset="general10", root=str(tmp_path)))


def test_config_errors_for_data_keys(tmp_path):
    with pytest.raises(ConfigError, match="data.dataset='imagenet21k' is not available"):
        read_dataset(DataConfig(dataset="imagenet21k", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.dataset=custom needs data.group_file"):
        read_dataset(DataConfig(dataset="custom", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.sampler.mode"):
        load_config([], ["data.sampler.mode=uniform"])


def test_data_check_cli(tmp_path, capsys):
    make_coop_root(tmp_path)
    assert main(["data", "check", "--config", str(REPO / "configs/data/general10.yaml"), f"data.root={tmp_path}",
                 "data.shots=4"]) == 0
    out = capsys.readouterr().out
    assert "general10" in out and "caltech101" in out and "OK" in out
    assert "class 'airplane' has 3 training images (< 4 shots)" in out
    (tmp_path / "sun397" / "SUN397" / "sun397_class_2" / "val_0.jpg").write_bytes(b"junk")
    assert main(["data", "check", "--config", str(REPO / "configs/data/general10.yaml"), f"data.root={tmp_path}"]) == 1
    out = capsys.readouterr().out
    assert "unreadable image" in out and "val_0.jpg" in out and "1 problem(s) found" in out
    assert main(["data", "check", "--config", str(REPO / "configs/data/plant6.yaml"), f"data.root={tmp_path}"]) == 2


def test_shipped_rs8_example_group_reads(tmp_path):
    for split in PER_SPLIT:
        for cls in ("Forest", "SeaLake"):
            write_image(tmp_path / "eurosat" / split / cls / "0.jpg", 1)
        write_image(tmp_path / "ucmerced" / "Images" / "beach" / f"{split}.tif", 2)
        (tmp_path / "ucmerced" / f"{split}.csv").write_text(f"beach/{split}.tif,beach\n")
    cfg = load_config([REPO / "configs/data/rs8_example.yaml"], [f"data.root={tmp_path}",
                                                                 f"data.group_file={REPO / 'configs/task_groups/rs8_example.yaml'}"])
    data = read_dataset(cfg.data)
    assert [t.key for t in data.group.tasks] == ["eurosat", "ucmerced"]
    assert data.group.tasks[0].classnames == ("Forest", "SeaLake")
    assert data.group.tasks[1].num_classes == 21 and data.splits["test"][-1].label == 3


def test_fewshot_subset_of_a_task_does_not_depend_on_its_place_in_the_group(coop_root):
    joint = load_data(DataConfig(dataset="general10", root=str(coop_root), shots=2), 1)
    alone = load_data(DataConfig(dataset="general10", root=str(coop_root), shots=2, tasks=["eurosat", "dtd"]), 1)
    for key in ("eurosat", "dtd"):
        pick = lambda d: sorted(p for p, k, _ in d.report["train"] if k == key)  # noqa: E731
        assert pick(joint) == pick(alone)


def test_fashion20_split_meta_must_agree_with_task_info(tmp_path):
    make_fashion20(tmp_path)
    split = tmp_path / "fashion20" / "split_dk_Fashion20.json"
    payload = json.loads(split.read_text())
    payload["meta"]["taskid2cname"].reverse()  # tasks swapped
    split.write_text(json.dumps(payload))
    with pytest.raises(DataError, match=r"taskid2cname\[0\].*disagrees"):
        read_dataset(DataConfig(dataset="fashion20", root=str(tmp_path)))
    del payload["meta"]  # no meta: the task list alone defines the classes
    split.write_text(json.dumps(payload))
    assert read_dataset(DataConfig(dataset="fashion20", root=str(tmp_path))).group.num_classes == 5


def test_task_left_without_images_after_skipping_is_named(tmp_path):
    make_coop_root(tmp_path)
    for img in (tmp_path / "eurosat" / "2750").rglob("test_*.jpg"):
        img.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"task\(s\) \['eurosat'\] have no test images .*skip_bad_images"):
        load_data(DataConfig(dataset="general10", root=str(tmp_path), shots=1, skip_bad_images=True), 1)
