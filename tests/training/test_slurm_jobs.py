"""slurm/train.sbatch on the local SLURM cluster (slurm/local_cluster.sh; .ci/run starts it): 2 CPU tasks
train as 1 does, and a warning signal mid-training makes the job save, requeue itself and resume to
the same learnable tensors as an uninterrupted run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed import needs_slurm

pytestmark = [pytest.mark.slow, needs_slurm]  # slow: see pyproject.toml, not in the quick set

REPO = Path(__file__).resolve().parents[2]



def _train_args(root, out, epochs):
    return ["--config", str(REPO / "configs/synthetic.yaml"), f"data.root={root}", "data.shots=0",
            "data.train_augment=none", "optim.batch_size=8", f"optim.epochs={epochs}", "optim.lr=0.05",
            f"train.output_dir={out}", "train.progress=false", "train.log_every=1"]


def _sbatch(name, ntasks, args, tmp, wait=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(SOFTCPT_PYTHON=sys.executable, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--ntasks-per-node={ntasks}", f"--output={tmp}/%x_%j.out",
           "--export=ALL", *(["--wait"] if wait else []), str(REPO / "slurm/train.sbatch"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return done, done.stdout.strip().split(";")[0]


def _learnable(run):
    states = torch.load(run / "prompt_checkpoint.pt", weights_only=True)["states"]
    return {f"{s}/{k}": v for s, tensors in states.items() for k, v in tensors.items()}


def _results(run):
    return json.loads((run / "results.json").read_text())["tasks"]


@pytest.fixture(scope="module")
def two_task_run(small_data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sbatch")
    done, job = _sbatch("sb-two", 2, _train_args(small_data_root, tmp / "runs", 20), tmp)
    log = next(tmp.glob("sb-two_*.out"), None)
    assert done.returncode == 0, (done.stderr, log.read_text() if log else "")
    assert "2 rank(s), launcher slurm" in log.read_text()
    return tmp / "runs" / "sb-two"


def test_two_tasks_train_as_one(two_task_run, small_data_root, tmp_path):
    done, _ = _sbatch("sb-one", 1, _train_args(small_data_root, tmp_path / "runs", 20), tmp_path)
    assert done.returncode == 0, done.stderr
    one = tmp_path / "runs" / "sb-one"
    assert _results(one) == _results(two_task_run)
    for name, ref in _learnable(one).items():
        torch.testing.assert_close(_learnable(two_task_run)[name], ref, rtol=1e-4, atol=1e-5)


def test_warning_signal_saves_requeues_and_resumes(two_task_run, small_data_root, tmp_path):
    done, job = _sbatch("sb-requeue", 2, _train_args(small_data_root, tmp_path / "runs", 20), tmp_path, wait=False)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "sb-requeue"
    latest = run / "checkpoints" / "joint" / "latest"
    t0 = time.time()
    while not latest.exists():  # mid-training: the first checkpoint (end of epoch 1) is written
        assert time.time() - t0 < 300, "no checkpoint within 300 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@T sends
    released = False
    while True:
        # squeue can answer empty for a moment while slurmctld requeues the job (or fail when it is busy):
        # the job is done only once its results are written and squeue no longer lists it.
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout.strip()
        if not state and (run / "results.json").exists():
            break
        if time.time() - t0 > 900:
            out = tmp_path / f"sb-requeue_{job}.out"
            pytest.fail(f"the requeued job did not finish: {out.read_text()[-3000:] if out.exists() else 'no log'}")
        if state == "PENDING BeginTime" and not released:
            # slurmctld holds a requeued job for about two minutes; an operator may release it at once.
            released = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"]).returncode == 0
        time.sleep(1)
    log = next(tmp_path.glob(f"sb-requeue_{job}.out")).read_text()
    assert "requeueing job" in log and "restart 1" in log, log[-3000:]
    assert "resuming" in (run / "train.log").read_text()
    assert _results(run) == _results(two_task_run)
    reference = _learnable(two_task_run)
    for name, value in _learnable(run).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6)


def test_array_sweep_then_report(small_data_root, tmp_path):
    """Two array tasks (two seeds) of a sweep file, then `softcpt-dist report`: mean ± std by hand."""
    import statistics

    from softcpt_dist.report import write_report
    from softcpt_dist.sweep import load_sweep

    sweep_file = tmp_path / "seeds.yaml"
    sweep_file.write_text(
        f"configs: [{REPO / 'configs/synthetic.yaml'}]\n"
        f"overrides: [data.root={small_data_root}, data.shots=0, optim.batch_size=8, optim.epochs=2, "
        f"train.output_dir={tmp_path / 'runs'}, train.progress=false]\n"
        "grid:\n  train.seed: [1, 2]\nname: 'nata-seed{train.seed}'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SOFTCPT_PYTHON=sys.executable, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run(["sbatch", "--wait", "--array=0-1", "--ntasks-per-node=1", f"--output={tmp_path}/%x_%A_%a.out",
                           str(REPO / "slurm/sweep.sbatch"), str(sweep_file)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert done.returncode == 0, (done.stderr, logs[-3000:])
    sweep = load_sweep(sweep_file)
    assert [sweep.state(r) for r in sweep.runs] == ["finished", "finished"]
    means = [json.loads((tmp_path / "runs" / f"nata-seed{s}" / "results.json").read_text())["mean"] for s in (1, 2)]
    text = write_report([tmp_path / "runs"])
    assert f"{statistics.fmean(means):.2f} ± {statistics.stdev(means):.2f}" in text


def _job_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(SOFTCPT_PYTHON=sys.executable, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def test_profile_and_scaling_jobs(small_data_root, tmp_path):
    """profile.sbatch on 2 tasks, and scaling.sbatch running its points (1 and 2 ranks) as srun steps."""
    import csv

    common = ["--config", str(REPO / "configs/synthetic.yaml"), "--warmup", "1", "--steps", "3",
              f"data.root={small_data_root}", "data.shots=0", "optim.batch_size=8", "train.progress=false"]
    for script, extra, env in [("profile.sbatch", [], _job_env(PROFILE_OUT=str(tmp_path / "prof"))),
                               ("scaling.sbatch", ["--ranks", "1", "2"], _job_env(SCALING_OUT=str(tmp_path / "study")))]:
        done = subprocess.run(["sbatch", "--wait", "--ntasks-per-node=2", f"--output={tmp_path}/%x_%j.out",
                               str(REPO / "slurm" / script), *extra, *common], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
        assert done.returncode == 0, (script, done.stderr, logs[-3000:])
    record = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert record["config"]["world_size"] == 2 and len(record["memory"]) == 2
    with open(tmp_path / "study" / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["world_size"]) for r in rows] == [1, 2]
    assert all((tmp_path / "study" / f"{name}.png").is_file() for name in ("throughput", "efficiency", "memory"))
