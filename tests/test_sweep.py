"""Sweep files: the grid's runs and names, their states, skipping finished runs, bad files named."""

import json

import pytest

from softcpt_dist.cli import main
from softcpt_dist.config import ConfigError
from softcpt_dist.sweep import listing, load_sweep


def _file(tmp_path, grid="grid:\n  method.variant: [NATA, CSTA]\n  train.seed: [1, 2]\n", name=None):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"overrides: [train.output_dir={tmp_path / 'runs'}, optim.epochs=1]\n" + grid +
                    (f"name: '{name}'\n" if name else ""))
    return path


def test_grid_runs_names_and_overrides(tmp_path):
    sweep = load_sweep(_file(tmp_path, name="{method.variant}-s{train.seed}"))
    assert [r.name for r in sweep.runs] == ["NATA-s1", "NATA-s2", "CSTA-s1", "CSTA-s2"]
    assert sweep.runs[1].overrides == [f"train.output_dir={tmp_path / 'runs'}", "optim.epochs=1",
                                       "method.variant=NATA", "train.seed=2", "train.run_name=NATA-s2"]
    assert sweep.config(sweep.runs[2]).method.variant == "CSTA"
    assert [r.name for r in load_sweep(_file(tmp_path)).runs][0] == "variantNATA-seed1"


def test_states_and_listing(tmp_path):
    sweep = load_sweep(_file(tmp_path, name="{method.variant}-s{train.seed}"))
    runs = tmp_path / "runs"
    (runs / "NATA-s1").mkdir(parents=True)
    (runs / "NATA-s1" / "results.json").write_text("{}")
    (runs / "NATA-s2").mkdir()
    (runs / ".sweep-status").mkdir()
    (runs / ".sweep-status" / "CSTA-s1.json").write_text(json.dumps({"rc": 2}))
    assert [sweep.state(r) for r in sweep.runs] == ["finished", "started", "failed", "pending"]
    assert listing(sweep).splitlines()[-1] == "4 runs: 1 finished, 1 failed, 1 started, 1 pending; failed: CSTA-s1"


def test_finished_runs_are_skipped_and_failures_recorded(tmp_path, caplog):
    missing = tmp_path / "no-such-data"  # a config that loads, and a run that fails on its data
    path = _file(tmp_path, f"grid:\n  train.seed: [1]\n  data.root: ['{missing}']\n", name="s{train.seed}")
    (tmp_path / "runs" / "s1").mkdir(parents=True)
    (tmp_path / "runs" / "s1" / "results.json").write_text("{}")
    assert main(["sweep", str(path), "--index", "0"]) == 0
    assert "finished already: skipped" in caplog.text
    (tmp_path / "runs" / "s1" / "results.json").unlink()
    assert main(["sweep", str(path), "data.dataset=plant6", "--index", "0"]) == 2  # recorded as failed
    assert load_sweep(path).state(load_sweep(path).runs[0]) == "failed"
    assert main(["sweep", str(path), "--index", "5"]) == 2


def test_bad_sweep_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="grid must map config keys to non-empty lists"):
        load_sweep(_file(tmp_path, "grid:\n  train.seed: 3\n"))
    with pytest.raises(ConfigError, match="both named 's'"):
        load_sweep(_file(tmp_path, name="s"))
    with pytest.raises(ConfigError, match="uses 'data.shots', which is not a grid key"):
        load_sweep(_file(tmp_path, name="{data.shots}"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")


@pytest.mark.slow
def test_the_papers_sweep_files_resolve(monkeypatch):
    """configs/sweeps/: every run of every benchmark's sweep resolves to a valid config."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    files = sorted((repo / "configs" / "sweeps").glob("*.yaml"))
    assert {f.stem for f in files} >= {"general10", "plant6", "fashion20", "general10_coop"}
    for f in files:
        sweep = load_sweep(f)
        configs = [sweep.config(r) for r in sweep.runs]
        assert len({(c.method.name, c.method.variant, c.method.coop_mode, c.data.shots, c.train.seed)
                    for c in configs}) == len(configs)


def test_named_settings_axis_sets_several_keys_per_value(tmp_path):
    grid = ("grid:\n  method:\n    zs: {method.name: zeroshot}\n"
            "    coop-CA: {method.name: coop, method.coop_mode: CA}\n  data.shots: [1, 2]\n")
    sweep = load_sweep(_file(tmp_path, grid, name="{method}-{data.shots}"))
    assert [r.name for r in sweep.runs] == ["zs-1", "zs-2", "coop-CA-1", "coop-CA-2"]
    assert sweep.runs[2].overrides[2:] == ["method.name=coop", "method.coop_mode=CA", "data.shots=1",
                                           "train.run_name=coop-CA-1"]
    cfg = sweep.config(sweep.runs[3])
    assert (cfg.method.name, cfg.method.coop_mode, cfg.data.shots) == ("coop", "CA", 2)
    with pytest.raises(ConfigError, match="grid axis 'method': each named setting must map config keys"):
        load_sweep(_file(tmp_path, "grid:\n  method:\n    zs: zeroshot\n"))


@pytest.mark.slow
def test_the_micro_comparison_sweep_resolves(monkeypatch):
    """configs/micro/compare.yaml: 12 methods x 5 shots x 3 seeds, each run a distinct valid config."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    sweep = load_sweep(repo / "configs" / "micro" / "compare.yaml")
    configs = [sweep.config(r) for r in sweep.runs]
    assert len(configs) == 180
    methods = {(c.method.name, c.method.variant if c.method.name == "softcpt" else c.method.coop_mode)
               for c in configs}
    assert len(methods) == 12 and {c.data.dataset for c in configs} == {"micro"}
    assert {c.model.pretrained for c in configs} == {"micro"}


def test_all_runs_every_unfinished_run_in_one_process(tmp_path, small_data_root, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"overrides: [train.output_dir={tmp_path / 'runs'}, data.root={small_data_root}, "
                    "method.name=zeroshot, train.progress=false]\ngrid:\n  train.seed: [1, 2]\nname: 's{train.seed}'\n")
    (tmp_path / "runs" / "s1").mkdir(parents=True)
    (tmp_path / "runs" / "s1" / "results.json").write_text("{}")  # finished: skipped
    assert main(["sweep", str(path), "--all"]) == 0
    assert (tmp_path / "runs" / "s2" / "results.json").is_file()
    assert capsys.readouterr().out.splitlines()[-1] == "2 runs: 2 finished"
