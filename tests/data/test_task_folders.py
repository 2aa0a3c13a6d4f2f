"""The built-in dataset's task_folders layout, few-shot subsets, and bad data or task definitions."""

import subprocess
import sys

import pytest

from softcpt_dist.data import DataError, fewshot_subset, read_task_folders
from softcpt_dist.data.dataset import MultiTaskImageDataset
from softcpt_dist.data.tasks import TaskGroup, TaskSpec


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


@pytest.mark.slow
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
