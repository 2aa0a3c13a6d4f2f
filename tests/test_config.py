"""Config files, overrides and their errors; choices are declared once, at their fields."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from softcpt_dist.cli import main
from softcpt_dist.config import ConfigError, load_config

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
    ("engine.deepspeed={zero_optimization: {stage: 2}}",
     r"engine.deepspeed.zero_optimization.stage=2: set the ZeRO stage with engine.zero_stage \(it is 0\)"),
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
    # Task-group files and sweep files are not experiment configs (sweeps: tests/test_sweep.py).
    files = sorted(f for f in (REPO / "configs").rglob("*.yaml") if f.parent.name not in ("task_groups", "sweeps"))
    assert files
    for f in files:
        if "grid" in OmegaConf.load(f):  # a sweep file beside its configs (configs/micro/compare.yaml)
            continue
        load_config([f])
    # Task-group files (data.group_file) are not experiment configs: they list tasks.
    for f in (REPO / "configs" / "task_groups").glob("*.yaml"):
        assert OmegaConf.load(f).tasks


def test_yaml_boolean_words_stay_strings_where_the_config_wants_one(tmp_path):
    cfg = load_config([], ["train.run_name=off", "text.shard=off", "train.progress=off"])
    assert (cfg.train.run_name, cfg.text.shard, cfg.train.progress) == ("off", "off", False)
    (tmp_path / "exp.yaml").write_text("text:\n  shard: off\n")
    assert load_config([tmp_path / "exp.yaml"]).text.shard == "off"
    with pytest.raises(ConfigError, match="text.shard"):
        load_config([], ["text.shard=on"])


def test_stop_signals_are_configurable_and_checked():
    import os
    import signal

    from softcpt_dist.training.signals import StopSignals

    assert load_config([], []).train.stop_signals == ["USR1", "TERM"]
    with pytest.raises(ConfigError, match="train.stop_signals: 'KILL' is not a signal a run can catch"):
        load_config([], ["train.stop_signals=[USR2,KILL]"])
    cfg = load_config([], ["train.stop_signals=[USR2,SIGTERM]"])
    with StopSignals(cfg.train.stop_signals) as signals:
        assert signal.getsignal(signal.SIGUSR1) != signals._handle  # USR1 is left alone (NCCL may own it)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert signals.received == signal.SIGUSR2


@pytest.mark.parametrize("arch", ["ViT-L-14", "ViT-H-14", "ViT-bigG-14"])
@pytest.mark.parametrize("benchmark", ["general10", "plant6", "fashion20"])
def test_large_model_recipes_fit_one_node_of_8_gpus(arch, benchmark):
    from softcpt_dist.training.engine import micro_batch_size
    cfg = load_config([REPO / "configs" / "recipes" / arch.lower() / f"{benchmark}.yaml"])
    assert (cfg.model.arch, cfg.data.dataset, cfg.data.shots) == (arch, benchmark, 16)
    assert (cfg.model.device, cfg.model.precision, cfg.engine.backend) == ("cuda", "bf16", "nccl")
    assert cfg.data.cache.enabled and cfg.data.cache.train_views == cfg.optim.epochs  # a view per epoch
    assert micro_batch_size(cfg.optim, cfg.engine, 8) == 4 and cfg.optim.lr == 0.002  # the paper's protocol
    assert cfg.train.stop_signals == ["USR2", "TERM"]
