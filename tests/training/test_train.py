"""End-to-end training on the pipeline check (configs/synthetic.yaml): it learns, runs are reproducible, CLIP
stays frozen, stepping modes."""

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from softcpt_dist import training
from softcpt_dist.cli import main
from softcpt_dist.config import Config, OptimConfig, load_config
from softcpt_dist.data.transforms import eval_transform
from softcpt_dist.training.experiment import run_train
from softcpt_dist.model import build_method
from softcpt_dist.model import PromptClassifier
from softcpt_dist.training.optim import epoch_lrs, lr_at, steps_per_update
from softcpt_dist.training.scope_training import ScopeJob, train_prompts

REPO = Path(__file__).resolve().parents[2]
CHANCE = {"colour": 20.0, "tone": 100 / 3, "size": 50.0, "pattern": 100 / 3}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The pipeline check (random-init CLIP, the synthetic 4 tasks), in-process, in a temp folder."""
    tmp = tmp_path_factory.mktemp("default-job")
    rc = main(["train", "--config", str(REPO / "configs/synthetic.yaml"), f"data.root={tmp / 'data'}",
               f"train.output_dir={tmp / 'runs'}", "train.progress=false"])
    assert rc == 0
    return tmp / "runs" / "demo"


@pytest.mark.slow  # the whole pipeline-check job (its fixture)
def test_default_job_writes_its_run_folder(default_run):
    for name in ("config.yaml", "train.log", "metrics.jsonl", "results.json", "results.md", "prompt_checkpoint.pt"):
        assert (default_run / name).is_file(), name
    assert "softcpt-NATA" in (default_run / "results.md").read_text()
    assert "RANDOM weights" in (default_run / "train.log").read_text()


@pytest.mark.slow  # the whole pipeline-check job (its fixture)
def test_default_job_loss_goes_down_and_beats_chance_per_task(default_run):
    records = [json.loads(line) for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 50
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"]
    results = json.loads((default_run / "results.json").read_text())
    for key, chance in CHANCE.items():
        assert results["tasks"][key]["value"] > chance + 5, (key, results["tasks"][key])


@pytest.mark.slow  # the whole pipeline-check job (its fixture)
def test_eval_from_run_folder_reproduces_results(default_run):
    assert main(["eval", "--run", str(default_run), "train.progress=false"]) == 0
    trained = json.loads((default_run / "results.json").read_text())
    again = json.loads((default_run / "eval_test.json").read_text())
    for key in CHANCE:
        assert again["tasks"][key]["value"] == pytest.approx(trained["tasks"][key]["value"])


@pytest.mark.slow  # the whole pipeline-check job (its fixture)
@pytest.mark.parametrize("override,named", [("method.variant=CSTS", "method="),
                                            ("prompt.class_token_position=middle", "class_token_position"),
                                            ("model.arch=softcpt-tiny-rn", "arch=")])
def test_eval_refuses_a_checkpoint_made_for_another_setup(default_run, caplog, override, named):
    rc = main(["eval", "--run", str(default_run), override, "train.progress=false"])
    assert rc == 2
    assert named in caplog.text and "prompt_checkpoint.pt" in caplog.text


def test_rerun_with_the_same_name_replaces_old_metrics(tmp_path, small_data_root):
    for _ in range(2):
        result = run_train(_short_cfg(tmp_path, small_data_root, "train.run_name=same", "optim.epochs=1"))
    records = (result.path / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "epoch"' in r for r in records) == 1


def _train(cfg, model, group, samples, transform):
    return train_prompts(ScopeJob(model, group, samples, transform), cfg)


def _short_cfg(tmp_path, small_data_root, *extra):
    return load_config([], [f"data.root={small_data_root}", "data.shots=4", "optim.epochs=2", "optim.batch_size=8",
                            f"train.output_dir={tmp_path}", "train.progress=false", *extra])


def test_training_is_deterministic(tmp_path, small_data_root):
    a = run_train(_short_cfg(tmp_path, small_data_root, "train.run_name=a"))
    b = run_train(_short_cfg(tmp_path, small_data_root, "train.run_name=b"))
    sa = torch.load(a.path / "prompt_checkpoint.pt", weights_only=True)["states"]["joint"]
    sb = torch.load(b.path / "prompt_checkpoint.pt", weights_only=True)["states"]["joint"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


@pytest.mark.parametrize("variant", ["NATS", "CSTA"])
def test_clip_weights_stay_bit_identical(tiny_backbone, small_data, variant):
    cfg = Config()
    cfg.method.variant = variant
    cfg.optim = OptimConfig(epochs=2, batch_size=8, warmup_epochs=0, lr=0.1)
    cfg.train.progress = False
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    model = PromptClassifier(tiny_backbone, build_method(tiny_backbone, small_data.group, cfg.method, cfg.prompt))
    learn_before = {k: v.clone() for k, v in model.learnable_state_dict().items()}
    _train(cfg, model, small_data.group, small_data.splits["train"], eval_transform(tiny_backbone.preprocess_cfg))
    after = tiny_backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(learn_before[k], v) for k, v in model.learnable_state_dict().items())


def test_official_stepping_lr_sequence():
    cfg = OptimConfig()  # paper: lr 0.002, 50 epochs, 1 constant warm-up epoch at 1e-5
    cosine = lambda t: 0.001 * (1 + math.cos(math.pi * t / 50))  # noqa: E731
    plain = epoch_lrs(cfg, 1)
    assert plain[0] == 1e-5 and plain[1] == pytest.approx(0.002) and plain[49] == pytest.approx(cosine(48))
    for k in (3, 4):
        lrs = epoch_lrs(cfg, k)
        assert lrs[0] == 1e-5
        for e in range(1, 50):
            assert lrs[e] == pytest.approx(cosine(k * e - 1), abs=1e-12)
    assert epoch_lrs(cfg, 3)[17] == pytest.approx(0.0, abs=1e-12)  # NA: cosine bottoms out at epoch 17
    assert epoch_lrs(cfg, 4)[25] == pytest.approx(0.002, rel=1e-3)  # CA/CS: back at the peak by epoch 25
    assert lr_at(51, cfg) == pytest.approx(0.0, abs=1e-12)  # past its end the cosine continues periodically


def test_official_stepping_counts_and_training_lrs(tmp_path, small_data_root, small_data, tiny_backbone):
    cfg = _short_cfg(tmp_path, small_data_root, "optim.official_stepping=true")
    for variant, k in {"NATA": 3, "NATS": 3, "CATA": 4, "CSTS": 4}.items():
        cfg.method.variant = variant
        assert steps_per_update(cfg.optim, build_method(tiny_backbone, small_data.group, cfg.method, cfg.prompt)) == k
    cfg.method.name = "coop"
    assert steps_per_update(cfg.optim, build_method(tiny_backbone, small_data.group, cfg.method, cfg.prompt)) == 1
    result = run_train(_short_cfg(tmp_path, small_data_root, "optim.official_stepping=true", "optim.epochs=3",
                                  "train.run_name=official"))
    expected = epoch_lrs(load_config([], ["optim.epochs=3"]).optim, 3)
    assert [r["lr"] for r in result.history] == pytest.approx(expected)


def test_optimizer_steps_k_times_per_iteration(tiny_backbone, small_data):
    """k SGD steps with the same gradient: plain SGD (no momentum/decay) moves k times as far."""
    moves = {}
    for official in (False, True):
        cfg = Config()
        cfg.optim = OptimConfig(epochs=1, batch_size=64, warmup_epochs=0, momentum=0.0, weight_decay=0.0,
                                schedule="constant", lr=0.01, official_stepping=official)
        cfg.train.progress = False
        torch.manual_seed(0)
        model = PromptClassifier(tiny_backbone, build_method(tiny_backbone, small_data.group, cfg.method, cfg.prompt))
        start = model.method.meta_net.net.weight.detach().clone()
        samples = small_data.splits["train"][:16]
        cfg.optim.batch_size = 16
        _train(cfg, model, small_data.group, samples, eval_transform(tiny_backbone.preprocess_cfg))
        moves[official] = model.method.meta_net.net.weight.detach() - start
    assert torch.allclose(moves[True], 3 * moves[False], rtol=1e-3, atol=1e-8)


def test_coop_ca_trains_each_task_on_its_own(tmp_path, small_data_root):
    result = run_train(_short_cfg(tmp_path, small_data_root, "method.name=coop", "method.coop_mode=CA",
                                  "optim.epochs=1", "train.run_name=coop"))
    states = torch.load(result.path / "prompt_checkpoint.pt", weights_only=True)["states"]
    assert set(states) == {"colour", "tone", "size", "pattern"}
    assert all(s["ctx"].shape[0] == 1 for s in states.values())
    assert {r["scope"] for r in result.history} == set(states)
    results = json.loads((result.path / "results.json").read_text())  # the report's cost columns, over every scope
    assert results["learnable_params"] == sum(t.numel() for s in states.values() for t in s.values())
    assert results["train_seconds"] == pytest.approx(sum(r["seconds"] for r in result.history))
    assert main(["eval", "--run", str(result.path), "train.progress=false"]) == 0


def test_zeroshot_and_linear_probe_run(tmp_path, small_data_root, tiny_backbone):
    zs = run_train(_short_cfg(tmp_path, small_data_root, "method.name=zeroshot", "train.run_name=zs"))
    assert set(zs.results["tasks"]) == set(CHANCE) and not zs.history
    lp = run_train(_short_cfg(tmp_path, small_data_root, "method.name=linear_probe", "train.run_name=lp",
                              "method.lp_search_steps=2", "method.lp_max_iter=50"))
    assert all(0 <= r["value"] <= 100 for r in lp.results["tasks"].values())
    lp_results = json.loads((lp.path / "results.json").read_text())
    assert len(lp_results["chosen_C"]) == 4 and "learnable_params" not in lp_results["chosen_C"]
    assert lp_results["learnable_params"] == (tiny_backbone.embed_dim + 1) * 13  # a (D + 1) x C_t classifier per task


def test_a_run_leaves_its_config_untouched(tmp_path, small_data_root, monkeypatch):
    """Derived values (absolute paths, device, run folder) live in the resolved run, not in the config;
    the run folder's config.yaml records the absolute paths."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config([], [f"data.root={os.path.relpath(small_data_root, tmp_path)}", "data.shots=2",
                           "optim.epochs=1", "optim.batch_size=8", "train.output_dir=runs",
                           "train.progress=false", "data.cache.dir=cache"])
    before = copy.deepcopy(cfg)
    result = training.run(cfg)
    assert cfg == before and cfg.train.run_name is None
    saved = load_config([result.path / "config.yaml"])
    assert saved.data.root == str(Path(small_data_root).resolve())
    assert saved.data.cache.dir == str(tmp_path / "cache") and saved.model.device == "cpu"


@pytest.mark.slow  # the whole pipeline-check job (its fixture)
def test_metrics_are_mirrored_to_tensorboard(default_run):
    """With tensorboard installed (the dev extra), every epoch's loss is also in the run's event files."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(default_run / "tensorboard"))
    events.Reload()
    losses = events.Scalars("joint/epoch/loss")
    records = [json.loads(line) for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e.step for e in losses] == [r["epoch"] for r in epochs]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in epochs])


def test_compare_zeroshot_scores_zero_shot_clip_beside_the_run(tmp_path, small_data_root, caplog):
    caplog.set_level("INFO", logger="softcpt_dist")
    rc = main(["train", "--config", str(REPO / "configs/synthetic.yaml"), f"data.root={small_data_root}",
               f"train.output_dir={tmp_path}", "train.run_name=cmp", "optim.epochs=1", "train.progress=false",
               "train.compare_zeroshot=true", "data.synthetic.train_per_class=6", "data.synthetic.val_per_class=2",
               "data.synthetic.test_per_class=3", "data.synthetic.image_size=32", "data.synthetic.seed=3"])
    assert rc == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    zeroshot = results["zero_shot"]
    assert set(zeroshot["tasks"]) == set(results["tasks"]) == set(CHANCE)
    assert zeroshot["mean"] == pytest.approx(sum(t["value"] for t in zeroshot["tasks"].values()) / len(CHANCE))
    assert any("softcpt-NATA" in r.message and "zero-shot" in r.message for r in caplog.records)
