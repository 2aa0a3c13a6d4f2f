"""Config files, overrides and their errors; the built-in dataset, few-shot subsets and bad data."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from softcpt_dist.cli import main
from softcpt_dist.config import ConfigError, load_config
from softcpt_dist.data import DataError, fewshot_subset, read_task_folders
from softcpt_dist.data.dataset import MultiTaskImageDataset
from softcpt_dist.data.tasks import TaskGroup, TaskSpec

REPO = Path(__file__).resolve().parents[1]


def test_yaml_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\n  epochs: 7\nmethod:\n  variant: NATS\n")
    (tmp_path / "exp.yaml").write_text("_base_: base.yaml\noptim:\n  epochs: 9\n")
    cfg = load_config([tmp_path / "exp.yaml"], ["optim.batch_size=4", "train.task_weights={colour: 2.0}"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (0.1, 9, 4)
    assert cfg.method.variant == "NATS" and cfg.train.task_weights == {"colour": 2.0}


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("nonsense=1", "nonsense"),
    ("optim.lr=fast", "optim.lr"),
    ("method.variant=XYZ", "method.variant"),
    ("optim.batch_size=0", "optim.batch_size"),
    ("optim.lr", "key=value"),
])
def test_bad_config_entries_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], [override])


def test_unknown_key_in_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config([tmp_path / "bad.yaml"])


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["train", "optim.lrr=1"]) == 2


def test_bad_saved_run_config_names_the_file(tmp_path, caplog):
    (tmp_path / "config.yaml").write_text("optim:\n  epochs: abc\n")
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "config.yaml" in caplog.text and "optim.epochs" in caplog.text


def test_shipped_configs_load():
    files = sorted(f for f in (REPO / "configs").rglob("*.yaml") if f.parent.name != "task_groups")
    assert files
    for f in files:
        load_config([f])
    # Task-group files (data.group_file) are not experiment configs: they list tasks.
    for f in (REPO / "configs" / "task_groups").glob("*.yaml"):
        assert OmegaConf.load(f).tasks


def test_builtin_dataset_layout(small_data):
    group = small_data.group
    assert [t.key for t in group.tasks] == ["colour", "tone", "size", "pattern"]
    assert [t.num_classes for t in group.tasks] == [5, 3, 2, 3]
    assert group.num_classes == 13
    counts = small_data.counts("train")
    assert all(n == 6 for task in counts for n in task)
    assert len(small_data.splits["test"]) == 13 * 3
    image, task, label, _ = MultiTaskImageDataset(small_data.splits["train"])[0]
    assert image.size == (32, 32) and 0 <= label < group.tasks[task].num_classes


def test_fewshot_subsets_are_deterministic_across_processes(small_data):
    code = ("import softcpt_dist; from softcpt_dist.data import read_task_folders, fewshot_subset; "
            f"d = read_task_folders({str(small_data.splits['train'][0].path.rsplit('/train/', 1)[0])!r}); "
            "print([s.path for s in fewshot_subset(d.splits['train'], 2, {seed}, d.group)[0]])")
    outs = [subprocess.run([sys.executable, "-c", code.format(seed=s)], capture_output=True, text=True,
                           check=True).stdout for s in (1, 1, 2)]
    assert outs[0] == outs[1] != outs[2]
    subset, short = fewshot_subset(small_data.splits["train"], 2, 1, small_data.group)
    assert len(subset) == 13 * 2 and not short
    _, short = fewshot_subset(small_data.splits["train"], 8, 1, small_data.group)
    assert len(short) == 13 and set(short.values()) == {6}


def test_corrupt_and_missing_images_are_named(small_data, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    sample = small_data.splits["train"][0]
    ds = MultiTaskImageDataset([type(sample)(str(bad), 0, 0), type(sample)(str(tmp_path / "gone.jpg"), 0, 0)])
    with pytest.raises(DataError, match="broken.jpg"):
        ds[0]
    with pytest.raises(DataError, match="gone.jpg"):
        ds[1]


def test_bad_data_roots(tmp_path, small_data_root):
    with pytest.raises(DataError, match="data root not found"):
        read_task_folders(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="tasks.json"):
        read_task_folders(tmp_path / "empty")
    (tmp_path / "empty" / "tasks.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed task manifest"):
        read_task_folders(tmp_path / "empty")


def test_bad_task_definitions():
    with pytest.raises(DataError, match="duplicate class names"):
        TaskSpec("t", "task", ("a", "b", "a"))
    with pytest.raises(DataError, match="no classes"):
        TaskSpec("t", "task", ())
    group = TaskGroup([TaskSpec("t", "task", ("a",))])
    with pytest.raises(DataError, match="unknown task 'nope'"):
        group.task_weights({"nope": 2.0})
