"""Base-to-new classes and unseen tasks (``data.subsample_classes`` / ``data.subsample_tasks``, the official
``DATASET.SUBSAMPLE_CLASSES`` / ``SUBSAMPLE_TASKS``): the halves and relabelling against the official
datasets' math (``datasets/general10.py``: ``m = ceil(n / 2)``, base = ``labels[:m]``, new = ``labels[m:]``,
``relabeler = {y: y_new for y_new, y in enumerate(selected)}``), applied after the few-shot cut; a base
run scored on the new half with its trained tensors and prompts rebuilt from the new names; refusals
by name."""

import json
import math

import pytest
import torch

from softcpt_dist.config import load_config
from softcpt_dist.data.dataset import MultiTaskData, Sample
from softcpt_dist.data.subsample import half, subsample_classes, subsample_tasks
from softcpt_dist.data.tasks import DataError, TaskGroup, TaskSpec
from softcpt_dist.training.checkpoint import CheckpointError

GROUP = TaskGroup([TaskSpec("pants", "pants type", ("jeans", "shorts", "chinos", "cargo", "joggers")),
                   TaskSpec("leaf", "leaf", ("healthy", "rust", "mildew", "blight")),
                   TaskSpec("sky", "sky", ("clear", "cloudy", "overcast"))])


def _official(n, which):
    m = math.ceil(n / 2)
    labels = list(range(n))
    selected = labels[:m] if which == "base" else labels[m:]
    return selected, {y: y_new for y_new, y in enumerate(selected)}


def _data():
    samples = [Sample(f"{t}-{c}-{i}.png", t, c) for t, task in enumerate(GROUP.tasks)
               for c in range(task.num_classes) for i in range(2)]
    return MultiTaskData(GROUP, {"train": samples, "val": samples[:4], "test": samples})


@pytest.mark.parametrize("which", ["base", "new"])
def test_class_halves_and_relabelling_follow_the_official_datasets(which):
    out = subsample_classes(_data(), which)
    for t, task in enumerate(GROUP.tasks):
        selected, relabel = _official(task.num_classes, which)
        assert half(task.num_classes, which) == selected
        assert out.group.tasks[t].classnames == tuple(task.classnames[i] for i in selected)
        assert (out.group.tasks[t].key, out.group.tasks[t].name) == (task.key, task.name)
        want = [Sample(s.path, s.task, relabel[s.label]) for s in _data().splits["test"]
                if s.task == t and s.label in relabel]
        assert [s for s in out.splits["test"] if s.task == t] == want
    assert [t.num_classes for t in out.group.tasks] == ([3, 2, 2] if which == "base" else [2, 2, 1])


def test_task_halves_follow_the_official_datasets_and_tasks_are_renumbered():
    base, new = subsample_tasks(_data(), "base"), subsample_tasks(_data(), "new")
    assert [t.key for t in base.group.tasks] == ["pants", "leaf"] and [t.key for t in new.group.tasks] == ["sky"]
    assert {s.task for s in new.splits["test"]} == {0} and all(s.path.startswith("2-") for s in new.splits["test"])
    assert subsample_tasks(_data(), "all") is not None and half(3, "all") == [0, 1, 2]


def test_empty_halves_are_refused_by_name():
    one_class = MultiTaskData(TaskGroup([TaskSpec("mono", "mono", ("only",))]), {"train": [], "val": [], "test": []})
    with pytest.raises(DataError, match=r"data.subsample_classes=new: task\(s\) \['mono'\] have a single class"):
        subsample_classes(one_class, "new")
    with pytest.raises(DataError, match="data.subsample_tasks=new: the group has 1 task"):
        subsample_tasks(one_class, "new")
    assert subsample_classes(one_class, "base").group.tasks[0].classnames == ("only",)


def _cfg(root, out, name, *extra):
    return load_config([], [f"data.root={root}", "data.shots=2", "optim.epochs=2", "optim.batch_size=4",
                            f"train.output_dir={out}", "train.progress=false", f"train.run_name={name}", *extra])


def test_the_base_half_trains_on_the_few_shot_images_of_a_run_on_all_classes(small_data_root, tmp_path):
    from softcpt_dist.data.loading import load_data
    every = load_data(_cfg(small_data_root, tmp_path, "x").data, 0)
    base = load_data(_cfg(small_data_root, tmp_path, "x", "data.subsample_classes=base").data, 0)
    kept = {(t, c) for t, task in enumerate(every.group.tasks) for c in half(task.num_classes, "base")}
    assert [s.path for s in base.splits["train"]] == [s.path for s in every.splits["train"] if (s.task, s.label) in kept]
    assert base.report["subsample_classes"] == "base"


def _evaluate_by_hand(cfg, checkpoint):
    """The new-half model built directly: the method for the new group, the trained tensors copied in."""
    from softcpt_dist.training.evaluate import evaluate
    from softcpt_dist.training.trainer import Trainer

    from softcpt_dist.metrics import merge_task_results

    trainer = Trainer(cfg)
    states = torch.load(checkpoint, weights_only=True)["states"]
    inputs, parts = trainer.inputs((cfg.train.eval_split,)), []
    for scope in trainer.scopes:  # one joint scope, or one per task (CoOp CA)
        model = trainer.scope_classifier(scope)
        with torch.no_grad():
            for name, p in model.method.learnable_parameters().items():
                p.copy_(states[scope.key][name])
        parts.append(evaluate(model, inputs.loader(cfg.train.eval_split, scope), scope.group, False, "test"))
    return merge_task_results(parts, trainer.data.group)


@pytest.mark.slow
@pytest.mark.parametrize("what,method", [("classes", ["method.variant=CATA"]),
                                         ("tasks", ["method.variant=NATA"]),
                                         ("classes", ["method.name=coop", "method.coop_mode=CA"])])
def test_a_base_run_is_scored_on_the_new_half_with_its_trained_prompts(small_data_root, tmp_path, what, method):
    from softcpt_dist.training.experiment import new_half, run_eval, run_train

    cfg = _cfg(small_data_root, tmp_path, "base", f"data.subsample_{what}=base", *method)
    result = run_train(cfg)
    saved = json.loads((result.path / "results.json").read_text())
    new_cfg = new_half(cfg)
    assert getattr(new_cfg.data, f"subsample_{what}") == "new"
    checkpoint = result.path / "prompt_checkpoint.pt"
    by_hand = _evaluate_by_hand(new_cfg, checkpoint)
    assert saved["new"]["tasks"] == by_hand["tasks"] and saved["new"]["subsample"][what] == "new"
    assert saved["new"]["tasks"] == run_eval(new_cfg, checkpoint, out_dir=result.path)["tasks"]
    assert (result.path / f"eval_test_new_{what}.json").is_file()
    base_keys, new_keys = set(saved["tasks"]), set(saved["new"]["tasks"])
    assert (base_keys == new_keys) if what == "classes" else not (base_keys & new_keys)


@pytest.mark.slow
def test_checkpoints_that_cannot_score_new_data_are_refused_by_name(small_data_root, tmp_path):
    from softcpt_dist.training.experiment import new_half, run_eval, run_train

    cs = _cfg(small_data_root, tmp_path, "cs", "data.subsample_classes=base", "method.variant=CSTA")
    result = run_train(cs)  # trains and scores the base classes; the new half is skipped with a warning
    assert "new" not in json.loads((result.path / "results.json").read_text())
    with pytest.raises(CheckpointError, match="softcpt-CSTA keeps learnable contexts of each trained class, so it "
                                              r"cannot score the new classes \(data.subsample_classes=new\)"):
        run_eval(new_half(cs), result.path / "prompt_checkpoint.pt")
    every = run_train(_cfg(small_data_root, tmp_path, "all", "method.variant=CATA"))
    with pytest.raises(CheckpointError, match="was made with data.subsample_classes=all, this run has "
                                              "data.subsample_classes=new"):
        run_eval(_cfg(small_data_root, tmp_path, "all", "method.variant=CATA", "data.subsample_classes=new"),
                 every.path / "prompt_checkpoint.pt")
    ts = _cfg(small_data_root, tmp_path, "ts", "data.subsample_tasks=base", "method.variant=NATS")
    ts_run = run_train(ts)
    with pytest.raises(CheckpointError, match="softcpt-NATS keeps learnable contexts of each trained task"):
        run_eval(new_half(ts), ts_run.path / "prompt_checkpoint.pt")
