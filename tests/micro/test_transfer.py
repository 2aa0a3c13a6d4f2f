"""What the micro world is for: its pre-trained CLIP transfers zero-shot above chance on every task, and
prompt tuning improves on zero-shot given enough shots.

The module pre-trains the micro CLIP once with the default settings (about 4.5 min here: shorter
pre-training leaves the position task at chance), on the default group. SoftCPT NATA is tested at 16
shots, where all three seeds of the README's comparison beat zero-shot (by 1.1 to 3.1 points); at 4
shots it does not yet (the issue's target; see the README)."""

import json
from pathlib import Path

import pytest

from softcpt_dist.cli import main
from softcpt_dist.micro.group import TASKS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("micro")
    return tmp, [f"model.micro.dir={tmp / 'clip'}", f"data.root={tmp / 'group'}", f"data.cache.dir={tmp / 'features'}",
                 f"train.output_dir={tmp / 'runs'}", "train.progress=false"]


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


def test_softcpt_at_16_shots_beats_zero_shot_on_the_group_mean(world):
    results = _train(world, "softcpt", "data.shots=16")
    assert results["mean"] > results["zero_shot"]["mean"] + 1, (results["mean"], results["zero_shot"]["mean"])
