"""softcpt-dist report: mean ± std over seeds per method and shots, per-task tables, missing seeds shown."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from softcpt_dist.cli import main
from softcpt_dist.report import ReportError, write_report


def _run(root: Path, name: str, method: str, shots: int, seed: int, scores: dict, dataset: str = "plant6"):
    path = root / name
    path.mkdir(parents=True)
    tasks = {k: {"name": k, "metric": "accuracy", "value": v, "num_samples": 10, "num_classes": 2}
             for k, v in scores.items()}
    (path / "results.json").write_text(json.dumps({"method": method, "arch": "RN50", "split": "test", "shots": shots,
                                                   "seed": seed, "tasks": tasks,
                                                   "mean": statistics.fmean(scores.values())}))
    (path / "config.yaml").write_text(f"data:\n  dataset: {dataset}\n  group_file: null\n")
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    scores = {(1, 1): {"a": 50.0, "b": 70.0}, (1, 2): {"a": 54.0, "b": 74.0}, (1, 3): {"a": 52.0, "b": 78.0},
              (4, 1): {"a": 60.0, "b": 80.0}, (4, 2): {"a": 62.0, "b": 84.0}}
    for (shots, seed), s in scores.items():
        _run(root, f"nata-{shots}-{seed}", "softcpt-NATA", shots, seed, s)
    _run(root, "coop-1-1", "coop-MT", 1, 1, {"a": 40.0, "b": 60.0})
    return root, scores


def test_tables_are_mean_and_sample_std_over_seeds(runs, tmp_path):
    root, scores = runs
    text = write_report([root], tmp_path / "out")
    one = [statistics.fmean(scores[(1, s)].values()) for s in (1, 2, 3)]  # 60, 64, 65
    four = [statistics.fmean(scores[(4, s)].values()) for s in (1, 2)]  # 70, 73
    row = next(line for line in text.splitlines() if line.startswith("| softcpt-NATA") and "average" not in line)
    assert f"{statistics.fmean(one):.2f} ± {statistics.stdev(one):.2f}" in row  # 63.00 ± 2.65
    # 4 shots has 2 of the table's 3 seeds: shown with its count, never as a full average
    assert f"{statistics.fmean(four):.2f} ± {statistics.stdev(four):.2f} (2/3 seeds)" in row
    assert row.rstrip(" |").endswith(f"{(statistics.fmean(one) + statistics.fmean(four)) / 2:.2f}")
    coop = next(line for line in text.splitlines() if line.startswith("| coop-MT"))
    assert "50.00 (1/3 seeds)" in coop and "— (1/2 shots)" not in coop and "(1/2 shots)" in coop
    task_a = [scores[(1, s)]["a"] for s in (1, 2, 3)]
    assert f"{statistics.fmean(task_a):.2f} ± {statistics.stdev(task_a):.2f}" in text  # per-task table
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    cell = next(r for r in rows if r["method"] == "softcpt-NATA" and r["shots"] == "1" and r["task"] == "mean")
    assert float(cell["mean"]) == pytest.approx(statistics.fmean(one)) and cell["n_seeds"] == "3"
    assert float(cell["std"]) == pytest.approx(statistics.stdev(one))


def test_cli_writes_latex_and_names_bad_runs(runs, tmp_path, caplog):
    root, _ = runs
    assert main(["report", str(root), "--out", str(tmp_path / "o"), "--latex"]) == 0
    assert "\\pm" in (tmp_path / "o" / "report.tex").read_text()
    _run(root, "again", "softcpt-NATA", 1, 2, {"a": 1.0, "b": 2.0})
    with pytest.raises(ReportError, match="two runs of softcpt-NATA on plant6 \\(1 shots, seed 2\\)"):
        write_report([root])
    (root / "again" / "results.json").write_text("{")
    assert main(["report", str(root / "again")]) == 2
    assert "again: cannot read its results.json" in caplog.text
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_report_of_a_real_run(tmp_path):
    """A finished training run's own files (results.json, config.yaml) are what report reads."""
    from softcpt_dist.data import generate_synthetic
    from softcpt_dist.config import SyntheticDataConfig

    generate_synthetic(tmp_path / "data", SyntheticDataConfig(train_per_class=4, val_per_class=2, test_per_class=2))
    assert main(["train", f"data.root={tmp_path / 'data'}", "data.shots=2", "optim.epochs=1",
                 f"train.output_dir={tmp_path / 'runs'}", "train.run_name=r", "train.progress=false"]) == 0
    results = json.loads((tmp_path / "runs" / "r" / "results.json").read_text())
    text = write_report([tmp_path / "runs"])
    assert "## synthetic · softcpt-tiny · test" in text and f"{results['mean']:.2f}" in text


def _base_run(root: Path, name: str, method: str, seed: int, base: dict, new: dict, what: str = "classes"):
    path = _run(root, name, method, 4, seed, base)
    results = json.loads((path / "results.json").read_text())
    results["new"] = {"subsample": {"classes": "new" if what == "classes" else "all",
                                    "tasks": "new" if what == "tasks" else "all"},
                      "tasks": {k: {"name": k, "metric": "accuracy", "value": v, "num_samples": 5, "num_classes": 1}
                                for k, v in new.items()}, "mean": statistics.fmean(new.values())}
    (path / "results.json").write_text(json.dumps(results))
    (path / "config.yaml").write_text(f"data:\n  dataset: plant6\n  group_file: null\n  subsample_{what}: base\n")


def test_base_runs_get_base_new_and_harmonic_mean_tables(tmp_path):
    """H is the harmonic mean of the seed-averaged base and new scores (CoCoOp, Table 1)."""
    root = tmp_path / "b2n"
    base = {1: {"a": 80.0, "b": 70.0}, 2: {"a": 84.0, "b": 72.0}}
    new = {1: {"a": 50.0, "b": 40.0}, 2: {"a": 56.0, "b": 42.0}}
    for seed in (1, 2):
        _base_run(root, f"nata-{seed}", "softcpt-NATA", seed, base[seed], new[seed])
    _base_run(root, "zs-1", "zeroshot", 1, {"a": 60.0, "b": 60.0}, {"a": 60.0, "b": 58.0})
    _base_run(root, "unseen-1", "softcpt-NATA", 1, {"a": 70.0, "b": 70.0}, {"c": 30.0}, what="tasks")
    _run(root, "plain-1", "softcpt-NATA", 4, 1, {"a": 1.0, "b": 1.0})  # a run on all classes stays apart
    text = write_report([root], tmp_path / "out")
    b = statistics.fmean(statistics.fmean(base[s].values()) for s in (1, 2))  # 76.5
    n = statistics.fmean(statistics.fmean(new[s].values()) for s in (1, 2))  # 47.0
    assert "## plant6 · base-to-new classes · RN50 · test" in text and "## plant6 · RN50 · test" in text
    assert "### plant6 · base-to-new classes · 4 shots: base / new / harmonic mean" in text
    row = next(line for line in text.splitlines() if line.startswith("| softcpt-NATA |") and "47.00" in line)
    sb, sn = (statistics.stdev(statistics.fmean(h[s].values()) for s in (1, 2)) for h in (base, new))
    assert row == f"| softcpt-NATA | {b:.2f} ± {sb:.2f} | {n:.2f} ± {sn:.2f} | {2 * b * n / (b + n):.2f} |"
    assert "| zeroshot | 60.00 (1/2 seeds) | 59.00 (1/2 seeds) | 59.50 |" in text
    assert "### plant6 · unseen tasks · 4 shots: seen tasks / unseen tasks / harmonic mean" in text
    assert "| softcpt-NATA | 70.00 | 30.00 | 42.00 |" in text
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert any(r["task"] == "new/mean" and r["method"] == "zeroshot" and float(r["mean"]) == 59.0 for r in rows)


def test_population_std_and_the_official_ci95_are_offered(runs, tmp_path):
    """The official parse_test_res.py: np.std (population) and 1.96 * np.std / sqrt(n) with --ci95."""
    import math
    root, scores = runs
    one = [statistics.fmean(scores[(1, s)].values()) for s in (1, 2, 3)]
    population = statistics.pstdev(one)
    text = write_report([root], tmp_path / "p", spread="population")
    assert f"{statistics.fmean(one):.2f} ± {population:.2f}" in text and "population std over seeds (n)" in text
    ci = 1.96 * population / math.sqrt(3)
    assert f"{statistics.fmean(one):.2f} ± {ci:.2f}" in write_report([root], spread="ci95")
    rows = list(csv.DictReader((tmp_path / "p" / "report.csv").open()))
    cell = next(r for r in rows if r["method"] == "softcpt-NATA" and r["shots"] == "1" and r["task"] == "mean")
    assert float(cell["population_std"]) == pytest.approx(population) and float(cell["ci95"]) == pytest.approx(ci)
    assert main(["report", str(root), "--spread", "ci95"]) == 0
    with pytest.raises(ReportError, match="--spread 'iqr' is not one of"):
        write_report([root], spread="iqr")


def test_the_cost_columns_are_learnable_elements_and_mean_training_minutes(runs, tmp_path):
    """The paper's layout: #params and training time (minutes, from each run's own timing) per method."""
    root, _ = runs
    for path, params, seconds in ((root / "nata-1-1", 10_000, 60.0), (root / "nata-4-1", 10_000, 180.0),
                                  (root / "coop-1-1", 2_048, 30.0)):
        results = json.loads((path / "results.json").read_text())
        results.update(learnable_params=params, train_seconds=seconds)
        (path / "results.json").write_text(json.dumps(results))
    text = write_report([root], tmp_path / "c", with_latex=True)
    header = next(line for line in text.splitlines() if line.startswith("| method | 1 shots"))
    assert header.endswith("| average | #params | time (min) |")
    nata = next(line for line in text.splitlines() if line.startswith("| softcpt-NATA |"))  # the main table's
    assert nata.endswith("| 10,000 | 2.0 |")  # the mean over the runs that recorded a time
    assert "| coop-MT |" in text and "| 2,048 | 0.5 |" in text
    assert "\\#params & Time (min)" in (tmp_path / "c" / "report.tex").read_text()
