"""Multi-rank training on DeepSpeed (2 ranks over gloo, tiny CLIP): equivalence with one rank,
ZeRO-3 partitioning, exact distributed evaluation, resume after SIGKILL, SIGTERM, a dead rank."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softcpt_dist.distributed import WorldInfo, first_slurm_host, world_info_from_env

pytestmark = pytest.mark.slow  # see pyproject.toml: not in the quick set

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 after 18 SGD steps; only the summation order of gradients differs


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _args(root, out, name, *extra):
    return ["train", f"data.root={root}", "data.shots=0", "data.train_augment=none", "optim.batch_size=8",
            "optim.epochs=2", "optim.lr=0.05", f"train.output_dir={out}", f"train.run_name={name}",
            "train.progress=false", "train.log_every=1", *extra]


def _launch(nproc, args, torchrun=False, **kw):
    if nproc == 1 and not torchrun:
        cmd = [sys.executable, "-m", "softcpt_dist.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "softcpt_dist.cli", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(nproc, args, timeout=240, torchrun=False):
    proc = _launch(nproc, args, torchrun)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def _weights(run):
    return torch.load(run / "prompt_checkpoint.pt", weights_only=True)["states"]["joint"]


def _epoch_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]


def _assert_scored_on_shares(run: Path):
    """Class-parallel scoring ran: image features and softmax statistics exchanged, no class feature."""
    records = _epoch_records(run)
    assert records and all(r["softmax_stats_bytes_per_step"] > 0 and r["text_gather_bytes_per_step"] == 0
                           for r in records), records


def _assert_same_training(a: Path, b: Path):
    assert _losses(a) == pytest.approx(_losses(b), rel=TOL["rtol"], abs=TOL["atol"])
    wa, wb = _weights(a), _weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], **TOL)
    ra, rb = (json.loads((r / "results.json").read_text())["tasks"] for r in (a, b))
    assert ra == rb


def test_world_info_is_a_pure_function_of_the_environment():
    assert world_info_from_env({}) == WorldInfo()
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
                "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert world_info_from_env(torchrun) == WorldInfo(3, 8, 1, 2, "n1", 1234, "env")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    assert world_info_from_env(slurm) == WorldInfo(5, 8, 1, 4, "gpu07", 24242, "slurm")
    assert world_info_from_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "29400"}).master_addr == "head"
    assert world_info_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == WorldInfo()
    # The batch script itself (no srun step) is one process, whatever --ntasks the job has.
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242"}
    assert world_info_from_env(batch_script) == WorldInfo()
    assert first_slurm_host("node[03-05,9],gpu1") == "node03" and first_slurm_host("solo") == "solo"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, small_data_root):
    out = tmp_path_factory.mktemp("dist")
    rc, log = _run(1, _args(small_data_root, out, "single"))
    assert rc == 0, log
    return out / "single"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_match_one_rank_with_twice_the_micro_batch(single_run, small_data_root, tmp_path, stage):
    rc, log = _run(2, _args(small_data_root, tmp_path, "two", f"engine.zero_stage={stage}"))
    assert rc == 0, log
    _assert_same_training(tmp_path / "two", single_run)
    memory = json.loads((tmp_path / "two" / "memory_joint.json").read_text())["ranks"]
    single = json.loads((single_run / "memory_joint.json").read_text())["ranks"][0]["frozen_param_bytes"]
    for rank in memory:
        expected = single / 2 if stage == 3 else single  # ZeRO-3 partitions the frozen CLIP too
        assert rank["frozen_param_bytes"] == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_dense_text_path_on_two_zero3_ranks_matches_the_shared_prefix_path(single_run, small_data_root, tmp_path,
                                                                           activation_checkpointing):
    """The shared-prefix path (single_run, the default) under ZeRO-3's parameter gathering: the same training
    as the dense reference path, partitioned over 2 ranks."""
    rc, log = _run(2, _args(small_data_root, tmp_path, "dense", "engine.zero_stage=3", "text.path=dense",
                            f"engine.activation_checkpointing={str(activation_checkpointing).lower()}"))
    assert rc == 0, log
    _assert_same_training(tmp_path / "dense", single_run)
    rc, log = _run(2, _args(small_data_root, tmp_path, "shared", "engine.zero_stage=3",
                            f"engine.activation_checkpointing={str(activation_checkpointing).lower()}"))
    assert rc == 0, log
    _assert_same_training(tmp_path / "shared", single_run)


def test_class_sampling_draws_the_same_classes_on_two_ranks_as_on_one(small_data_root, tmp_path):
    """method.class_sample_rate: the positives are the global micro-batch's and the negatives are drawn
    from the step's seed, so 2 ranks (class-parallel text) train exactly as one process."""
    sampled = ("method.variant=CATA", "method.class_sample_rate=0.3")
    for nproc, name in ((1, "one"), (2, "two")):
        rc, log = _run(nproc, _args(small_data_root, tmp_path, name, *sampled, "engine.zero_stage=2"))
        assert rc == 0, log
    _assert_same_training(tmp_path / "two", tmp_path / "one")


@pytest.mark.parametrize("method, epochs, two_ranks", [("kgcoop", 1, ()), ("cocoop", 1, ("engine.zero_stage=3",)),
                                                      # 4 epochs: by then 10 of its 32 updates are projected
                                                      ("prograd", 4, ("engine.grad_accum_steps=2",)),
                                                      ("plot", 1, ("engine.zero_stage=3",))],
                         ids=["kgcoop", "cocoop-zero3", "prograd-accumulated", "plot-zero3"])
def test_per_task_baselines_train_the_same_on_two_ranks(small_data_root, tmp_path, method, epochs, two_ranks):
    """KgCoOp's penalty is added share by share (class-parallel scoring); CoCoOp's ranks each encode their own images' prompts (here under ZeRO-3); ProGrad projects the gradient
    reduced over ranks and accumulated over micro-batches, its guide loss merged from the shares' statistics; PLOT's ranks agree on Sinkhorn's stopping, and its
    per-position image features gather their partitioned weights (ZeRO-3): 2 ranks
    train exactly as one process."""
    args = (f"method.name={method}", "prompt.n_ctx=4", f"optim.epochs={epochs}")
    for nproc, name, extra in ((1, "one", ()), (2, "two", two_ranks)):
        rc, log = _run(nproc, _args(small_data_root, tmp_path, name, *args, *extra))
        assert rc == 0, log
    if method in ("kgcoop", "prograd"):
        _assert_scored_on_shares(tmp_path / "two")
    elif method == "plot":  # per-position image features: the class features are gathered
        assert all(r["text_gather_bytes_per_step"] > 0 for r in _epoch_records(tmp_path / "two"))
    wa, wb = (torch.load(tmp_path / r / "prompt_checkpoint.pt", weights_only=True)["states"] for r in ("two", "one"))
    assert sorted(wa) == sorted(wb) and len(wa) == 4  # one scope per task (each trains each task on its own)
    for scope in wa:
        for name in wa[scope]:
            torch.testing.assert_close(wa[scope][name], wb[scope][name], **TOL)


def test_zero3_in_a_single_process_without_a_launcher(single_run, small_data_root, tmp_path):
    """ZeRO-3 on one rank started without a launcher (its own rendezvous)."""
    rc, log = _run(1, _args(small_data_root, tmp_path, "z3", "engine.zero_stage=3"))
    assert rc == 0, log
    _assert_same_training(tmp_path / "z3", single_run)


def test_gradient_accumulation_matches_the_full_batch(single_run, small_data_root, tmp_path):
    """Also the torchrun path with a single rank."""
    rc, log = _run(1, _args(small_data_root, tmp_path, "gas", "engine.grad_accum_steps=2"), torchrun=True)
    assert rc == 0, log
    # Logged losses are per micro-batch here; the weights and metrics must match.
    wa, wb = _weights(tmp_path / "gas"), _weights(single_run)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], **TOL)


def test_deepspeed_launcher_runs_the_cli(small_data_root, tmp_path):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port",
           str(_free_port()), "--module", "softcpt_dist.cli", *_args(small_data_root, tmp_path, "ds", "optim.epochs=1")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rank(s), launcher env" in proc.stdout + proc.stderr
    assert (tmp_path / "ds" / "results.json").is_file()


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_evaluation_equals_single_process(single_run):
    # 39 test images: not divisible by 2 ranks.
    rc, log = _run(2, ["eval", "--run-dir", str(single_run), "train.progress=false", "train.eval_batch_size=4"])
    assert rc == 0, log
    two = json.loads((single_run / "eval_test.json").read_text())
    trained = json.loads((single_run / "results.json").read_text())
    assert two["tasks"] == trained["tasks"]
    assert sum(t["num_samples"] for t in two["tasks"].values()) == 39


def _wait_for(path: Path, proc, timeout=180):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path} appeared:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(single_run, small_data_root, tmp_path):
    args = _args(small_data_root, tmp_path, "killed", "train.checkpoint_every=3", "train.keep_checkpoints=5")
    proc = _launch(1, args)
    _wait_for(tmp_path / "killed" / "checkpoints" / "joint" / "step000000006", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "killed" / "prompt_checkpoint.pt").exists()  # it really stopped mid-training
    rc, log = _run(1, args + ["train.resume=latest"])
    assert rc == 0, log
    assert "resumed from" in log
    wa, wb = _weights(tmp_path / "killed"), _weights(single_run)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], **TOL)
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["tasks"] == \
        json.loads((single_run / "results.json").read_text())["tasks"]
    # Epoch records too: the resumed epoch counts the steps before the kill (saved with the checkpoint).
    for key in ("loss", "train_acc"):
        assert [r[key] for r in _epochs(tmp_path / "killed")] == pytest.approx([r[key] for r in _epochs(single_run)],
                                                                               rel=TOL["rtol"], abs=TOL["atol"])


def test_rows_kept_on_their_owner_survive_a_kill_of_two_ranks(small_data_root, tmp_path):
    """SoftCPT CSTA on 2 ranks (ZeRO-0): the class contexts' rows stay on the rank whose share reads them,
    so each checkpoint must first bring every rank's rows together. Killed after its second checkpoint and
    resumed, the run ends as the uninterrupted one."""
    extra = ["method.variant=CSTA", "optim.epochs=6", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    rc, log = _run(2, _args(small_data_root, tmp_path, "whole", *extra))
    assert rc == 0, log
    args = _args(small_data_root, tmp_path, "killed", *extra)
    proc = _launch(2, args)
    _wait_for(tmp_path / "killed" / "checkpoints" / "joint" / "step000000006", proc)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in ranks:  # torchrun starts each rank in its own session: kill them, then the launcher
        os.kill(int(pid), signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "killed" / "prompt_checkpoint.pt").exists()
    rc, log = _run(2, args + ["train.resume=latest"])
    assert rc == 0, log
    assert "resumed from" in log
    _assert_same_training(tmp_path / "killed", tmp_path / "whole")


def _epochs(run):
    """The last record of each epoch (a resumed run logs an interrupted epoch's record once, after resuming)."""
    records = {}
    for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        if r["kind"] == "epoch":
            records[r["epoch"]] = r
    return [records[e] for e in sorted(records)]


def _launch_like_srun(nproc, args):
    """One process per rank with SLURM's task variables, as `srun --ntasks=N softcpt-dist ...` starts them."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = {**_env(), "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nproc), "SLURM_STEP_NUM_TASKS": str(nproc),
               "SLURM_LOCALID": str(rank), "SLURM_STEP_TASKS_PER_NODE": str(nproc), "SLURM_JOB_NODELIST": "localhost",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "softcpt_dist.cli", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def test_sigterm_saves_and_exits_with_the_preemption_code(small_data_root, tmp_path):
    procs = _launch_like_srun(2, _args(small_data_root, tmp_path, "term", "optim.epochs=50", "engine.zero_stage=2"))
    ckpts = tmp_path / "term" / "checkpoints" / "joint"
    _wait_for(ckpts / "latest", procs[0])
    first = (ckpts / "latest").read_text()
    for p in procs:  # SLURM signals every task of the step
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outs
    assert "stop signal received" in outs[0] and "launcher slurm" in outs[0]
    latest = (ckpts / "latest").read_text()
    # a signal that lands right after an epoch's checkpoint, before the next step, saves that same step
    assert latest >= first and (ckpts / latest.strip()).is_dir()
    rc, log = _run(1, _args(small_data_root, tmp_path, "term", "optim.epochs=50", "engine.zero_stage=2",
                            "train.resume=latest", "optim.batch_size=8"), timeout=240)
    # The resumed job must run at the world size it was saved with: the sampler refuses otherwise.
    assert rc == 2 and "world_size: saved 2, now 1" in log


def test_a_dead_rank_ends_the_whole_job(small_data_root, tmp_path):
    proc = _launch(2, _args(small_data_root, tmp_path, "dead", "optim.epochs=50", "train.checkpoint_every=1",
                            "engine.timeout_s=30"))
    _wait_for(tmp_path / "dead" / "checkpoints" / "joint" / "latest", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    t0 = time.time()
    os.kill(int(workers[-1]), signal.SIGKILL)
    proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.time() - t0 < 60


def _slurm_cluster_up() -> bool:
    import shutil
    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout
    return any(state in out for state in ("idle", "mixed", "allocated"))


needs_slurm = pytest.mark.skipif(not _slurm_cluster_up(), reason="no SLURM cluster (.ci/run starts a local one: "
                                                                 "slurm/local_cluster.sh)")


def _srun(args, ntasks=2):
    cmd = ["srun", f"--ntasks={ntasks}", "--kill-on-bad-exit=1", "--job-name=softcpt-test", sys.executable, "-m",
           "softcpt_dist.cli", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@needs_slurm
def test_srun_on_a_real_slurm_cluster_matches_one_rank(single_run, small_data_root, tmp_path):
    proc = _srun(_args(small_data_root, tmp_path, "srun", "engine.zero_stage=3"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "2 rank(s), launcher slurm" in out
    _assert_same_training(tmp_path / "srun", single_run)


@needs_slurm
def test_slurm_warning_signal_saves_and_exits_75(small_data_root, tmp_path):
    proc = _srun(_args(small_data_root, tmp_path, "usr1", "optim.epochs=50"))
    _wait_for(tmp_path / "usr1" / "checkpoints" / "joint" / "latest", proc)
    jobs = subprocess.run(["squeue", "-h", "-n", "softcpt-test", "-o", "%i"], capture_output=True, text=True)
    job_ids = jobs.stdout.split()
    assert job_ids, "the srun job is not in the queue"
    subprocess.run(["scancel", "--signal=USR1", job_ids[-1]], check=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "stop signal received" in out


@pytest.mark.parametrize("exchange", ["structured", "former"])
def test_official_fp16_trains_on_two_ranks_as_on_one(small_data_root, tmp_path, exchange):
    """``model.precision=official_fp16`` on two ranks trains as one within fp16 rounding (losses within 1e-2
    relative, the contexts within 1e-2: 2^-10 per rounding, over 2 epochs). ``structured`` (the defaults):
    class-parallel scoring on fp16 share logits, the fp16 context gradients averaged in fp32 and the meta
    network's weight gradient formed from its factors. ``former`` (``text.scoring=gathered
    engine.gradient_exchange=deepspeed``): class features gathered, the engine averaging the fp16 gradients
    itself (DeepSpeed's reduction refuses fp16 on CPUs without oneDNN fp16)."""
    extra = () if exchange == "structured" else ("text.scoring=gathered", "engine.gradient_exchange=deepspeed")
    for n in (1, 2):
        rc, log = _run(n, _args(small_data_root, tmp_path, f"fp16-{n}", "model.precision=official_fp16", *extra))
        assert rc == 0, log
    one, two = tmp_path / "fp16-1", tmp_path / "fp16-2"
    if exchange == "structured":
        _assert_scored_on_shares(two)
        assert all(r["grad_factor_bytes_per_step"] > 0 for r in _epoch_records(two))
    else:
        assert all(r["text_gather_bytes_per_step"] > 0 and r["grad_factor_bytes_per_step"] == 0
                   for r in _epoch_records(two))
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-2)
    wa, wb = _weights(two), _weights(one)
    assert wa["task_ctx"].dtype == torch.float16
    for name in wa:
        torch.testing.assert_close(wa[name].float(), wb[name].float(), rtol=1e-2, atol=1e-2)


def test_official_amp_trains_on_two_ranks(small_data_root, tmp_path):
    """``model.precision=official_amp`` on two class-parallel ranks: the scaled fp32 gradients are averaged (by
    the structured exchange: the meta network's factors were recorded under fp16 autocast) and every rank takes
    or skips the same step. (One rank and two need not skip the same steps: the loss each
    backward scales differs, so their trajectories are not compared.)"""
    rc, log = _run(2, _args(small_data_root, tmp_path, "amp", "model.precision=official_amp"))
    assert rc == 0, log
    losses = _losses(tmp_path / "amp")
    assert losses and all(math.isfinite(v) for v in losses)
    assert _weights(tmp_path / "amp")["task_ctx"].dtype == torch.float32
