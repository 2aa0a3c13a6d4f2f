"""What the micro world is for: its pre-trained CLIP transfers zero-shot above chance on every task, and
SoftCPT at 4 shots beats zero-shot on the group mean.

The module pre-trains the micro CLIP once, with the default settings (about 4.5 min here: shorter
pre-training leaves the position task at chance), then runs on a smaller group (8 training, 30 test
images per class), where each test takes seconds."""

import json
from pathlib import Path

import pytest

from softcpt_dist.cli import main
from softcpt_dist.micro.group import TASKS

REPO = Path(__file__).resolve().parents[2]
GROUP = ["data.micro.train_per_class=8", "data.micro.val_per_class=4", "data.micro.test_per_class=30"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("micro")
    return tmp, [f"model.micro.dir={tmp / 'clip'}", f"data.root={tmp / 'group'}", f"data.cache.dir={tmp / 'features'}",
                 f"train.output_dir={tmp / 'runs'}", "train.progress=false", *GROUP]


def _train(world, name, *overrides):
    tmp, common = world
    assert main(["train", "--config", str(REPO / "configs/default.yaml"), *common, f"train.run_name={name}",
                 *overrides]) == 0
    return json.loads((tmp / "runs" / name / "results.json").read_text())


def test_zero_shot_is_above_chance_on_every_task(world):
    results = _train(world, "zs", "method.name=zeroshot")
    for task in TASKS:
        chance = 100 / task.num_classes
        assert results["tasks"][task.key]["value"] > chance + 5, (task.key, results["tasks"][task.key], chance)


def test_softcpt_at_4_shots_beats_zero_shot_on_the_group_mean(world):
    results = _train(world, "softcpt", "data.shots=4")
    assert results["mean"] > results["zero_shot"]["mean"] + 2, (results["mean"], results["zero_shot"]["mean"])
