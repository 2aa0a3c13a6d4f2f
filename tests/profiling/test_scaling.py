"""softcpt-dist scaling on 1 and 2 CPU ranks (torchrun): one CSV row per point with speed-up, efficiency,
ideal and cost-model throughput, the PNGs; a rerun keeps finished points; collect infers weak scaling."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from softcpt_dist.cli import main

pytestmark = pytest.mark.slow  # see pyproject.toml: not in the quick set

REPO = Path(__file__).resolve().parents[2]
PNGS = ("throughput.png", "efficiency.png", "memory.png", "step_split.png")


@pytest.fixture(scope="module")
def study(small_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "study"
    args = ["scaling", "run", "--config", str(REPO / "configs/synthetic.yaml"), "--ranks", "1", "2", "--warmup", "1",
            "--steps", "3", "--out", str(out), f"data.root={small_data_root}", "data.shots=0", "optim.batch_size=8",
            "train.progress=false"]
    assert main(args) == 0
    return out, args


def _rows(folder):
    with open(folder / "scaling.csv") as f:
        return list(csv.DictReader(f))


def _check_png(path):
    import matplotlib.image
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 0.05  # drawn on, not blank


def test_points_rows_and_plots(study):
    out, _ = study
    rows = _rows(out)
    assert [int(r["world_size"]) for r in rows] == [1, 2]
    assert {r["mode"] for r in rows} == {"strong"} and {r["samples_per_step"] for r in rows} == {"8"}
    assert [int(r["micro_batch"]) for r in rows] == [8, 4]
    one, two = rows
    assert float(one["efficiency"]) == 1.0 and float(one["speedup"]) == 1.0
    assert float(two["ideal_samples_per_s"]) == pytest.approx(2 * float(one["samples_per_s"]))
    assert float(two["efficiency"]) == pytest.approx(float(two["samples_per_s"]) / float(two["ideal_samples_per_s"]))
    assert float(two["predicted_samples_per_s"]) > 0  # the cost model, calibrated on the 1-rank profile
    for r in rows:
        assert float(r["step_ms"]) > 0 and float(r["peak_memory_mib"]) > 0
    for name in PNGS:
        _check_png(out / name)


def test_rerun_keeps_finished_points(study, caplog):
    out, args = study
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/profile.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/profile.json")} == before
    assert caplog.text.count("has its profile already: kept") == 2


def test_collect_infers_weak_scaling(study, tmp_path):
    out, _ = study
    for name in ("strong-w1", "strong-w2"):  # the same two profiles, as a weak study would have run them
        record = json.loads((out / name / "profile.json").read_text())
        world = record["config"]["world_size"]
        record["config"].update(micro_batch=8, samples_per_step=8 * world)
        (tmp_path / "weak" / name).mkdir(parents=True)
        (tmp_path / "weak" / name / "profile.json").write_text(json.dumps(record))
    shutil.copytree(out / "strong-w1", tmp_path / "strong" / "w1")
    shutil.copytree(out / "strong-w2", tmp_path / "strong" / "w2")
    assert main(["scaling", "collect", str(tmp_path / "weak"), str(tmp_path / "strong"), "--out",
                 str(tmp_path / "plots")]) == 0
    modes = sorted((r["mode"], int(r["world_size"])) for r in _rows(tmp_path / "plots"))
    assert modes == [("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)]
    for name in PNGS:
        _check_png(tmp_path / "plots" / name)


@pytest.mark.parametrize("args, message", [
    (["collect", "{tmp}/missing", "--out", "{tmp}/o"], "does not exist"),
    (["collect", "{tmp}", "--out", "{tmp}/o"], "no profile.json"),
    (["run", "--ranks", "1", "--vary", "model.arch", "--out", "{tmp}/o"], "--vary"),
    (["run", "--ranks", "3", "--out", "{tmp}/o", "optim.batch_size=8"], "does not split over 3"),
])
def test_bad_input_is_named(tmp_path, caplog, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "run":
        args[1:1] = ["--config", str(REPO / "configs/synthetic.yaml")]
    assert main(["scaling", *args]) == 2
    assert message in caplog.text
