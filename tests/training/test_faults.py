"""Faults a demanding user meets: malicious or truncated checkpoints, bad input under an existing run
name, concurrent runs, changed settings on resume, duplicate metrics after a resume, stale build
locks, a full disk, empty classes. Each test failed before its fix."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softcpt_dist.cli import main
from softcpt_dist.training.checkpoint import TrainingCheckpoints
from softcpt_dist.training.engine import StaleBuildLock, clear_stale_build_locks, extensions_dir
from softcpt_dist.training.run_lock import RunLock

SMALL = ["data.shots=2", "prompt.n_ctx=4", "optim.batch_size=8", "optim.lr=0.05", "train.progress=false"]


def _args(root, out, name, *extra):
    return ["train", f"data.root={root}", f"train.output_dir={out}", f"train.run_name={name}", *SMALL, *extra]


def _snapshot(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _checkpointed_run(root, out, name):
    """A finished 1-epoch run checkpointed at every step; its checkpoint folder and newest tag."""
    args = _args(root, out, name, "optim.epochs=1", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    assert main(args) == 0
    folder = out / name / "checkpoints" / "joint"
    return args, folder, folder / (folder / "latest").read_text().strip()


def _zero_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _records(run: Path):
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in ("time", "samples_per_s", "seconds")})
    return out


class _RunsCode:
    """Unpickling this runs code (it touches a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_file_that_would_run_code_is_refused(small_data_root, tmp_path, caplog):
    assert main(_args(small_data_root, tmp_path, "evil", "optim.epochs=1")) == 0
    tag = tmp_path / "evil" / "checkpoints" / "joint" / (tmp_path / "evil/checkpoints/joint/latest").read_text().strip()
    marker = tmp_path / "code-ran"
    torch.save({"module": _RunsCode(marker)}, tag / "mp_rank_00_model_states.pt")
    for resume in ("latest", str(tag)):
        assert main(_args(small_data_root, tmp_path, "evil", "optim.epochs=2", f"train.resume={resume}")) == 2
        assert not marker.exists()
    assert "refusing" in caplog.text and "mp_rank_00_model_states.pt" in caplog.text


def test_bad_input_under_an_existing_run_name_leaves_that_run_intact(small_data_root, tmp_path, caplog):
    assert main(_args(small_data_root, tmp_path, "keep", "optim.epochs=1", "train.checkpoint_every=1")) == 0
    before = _snapshot(tmp_path / "keep")
    for bad in (["data.tasks=[colour,nosuch]"], ["model.pretrained=/no/such/weights.pt"],
                ["method.name=nosuch"], ["method.variant=CATA", "prompt.n_class_ctx=0"],
                ["engine.grad_accum_steps=3"], ["optim.official_stepping=true", "engine.zero_stage=1"],
                ["optim.batch_size=32", "engine.grad_accum_steps=16"],
                ["train.resume=latest", "method.name=coop", "method.coop_mode=CA"]):
        assert main(_args(small_data_root, tmp_path, "keep", "optim.epochs=1", *bad)) == 2
        assert _snapshot(tmp_path / "keep") == before, bad
    # A valid fresh run under the name moves the old run aside, whole.
    assert main(_args(small_data_root, tmp_path, "keep", "optim.epochs=1")) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("keep.replaced-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == before
    assert "moved it to" in caplog.text


def test_a_second_live_run_under_one_name_is_refused(small_data_root, tmp_path, caplog):
    holder = RunLock(tmp_path / "busy")
    holder.acquire()
    try:
        assert main(_args(small_data_root, tmp_path, "busy", "optim.epochs=1")) == 2
        assert f"in use by another live run (pid {os.getpid()}" in caplog.text
        assert not (tmp_path / "busy").exists()
    finally:
        holder.release()
    # A lock left by a process that died (here: a pid that is gone) does not block.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".busy.lock").write_text(json.dumps({"host": "h", "pid": int(dead.stdout), "started": "then"}))
    assert main(_args(small_data_root, tmp_path, "busy", "optim.epochs=1")) == 0
    assert "previous holder" in caplog.text and not (tmp_path / ".busy.lock").exists()


def test_truncated_checkpoints_are_named_and_latest_falls_back(small_data_root, tmp_path, caplog):
    args, folder, newest = _checkpointed_run(small_data_root, tmp_path, "cut")
    states = newest / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    assert main(args[:-3] + ["optim.epochs=2", f"train.resume={newest}"]) == 2
    assert str(states) in caplog.text
    caplog.clear()
    assert main(args + ["train.resume=latest"]) == 0
    assert str(states) in caplog.text and "resuming from the older checkpoint step000000002" in caplog.text
    (newest / "train_state.pt").write_bytes(b"")  # a bare EOFError before: now the file is named
    assert main(args[:-3] + [f"train.resume={newest}"]) == 2
    assert str(newest / "train_state.pt") in caplog.text


def test_changed_settings_on_resume_are_refused_or_applied_never_half(small_data_root, tmp_path, caplog):
    args = _args(small_data_root, tmp_path, "chg", "optim.epochs=1")
    assert main(args) == 0
    config = (tmp_path / "chg" / "config.yaml").read_text()
    for key, value, saved in (("data.train_augment", "none", "'paper'"), ("train.task_weights", "{colour: 2.0}", "None"),
                              ("optim.batch_size", "4", None), ("optim.name", "adamw", "'sgd'"),
                              ("model.precision", "bf16", "'fp32'"), ("data.fewshot_seed", "5", None)):
        assert main(args + ["optim.epochs=2", "train.resume=latest", f"{key}={value}"]) == 2
        named = {"optim.batch_size": "batch_size", "data.fewshot_seed": "data.train_images="}.get(key) if saved is None \
            else f"{'optimizer' if key == 'optim.name' else key}={saved}"
        assert named in caplog.text, key
        assert (tmp_path / "chg" / "config.yaml").read_text() == config  # not recorded either
    assert main(args + ["optim.epochs=2", "train.resume=latest", "optim.momentum=0.5", "optim.weight_decay=0.0"]) == 0
    assert "optim.momentum changed from 0.9 to 0.5" in caplog.text
    folder = tmp_path / "chg" / "checkpoints" / "joint"
    saved = torch.load(folder / (folder / "latest").read_text().strip() / "mp_rank_00_model_states.pt",
                       weights_only=True)["optimizer"]["param_groups"][0]
    assert (saved["momentum"], saved["weight_decay"]) == (0.5, 0.0)
    assert "momentum: 0.5" in (tmp_path / "chg" / "config.yaml").read_text()


def test_metrics_after_a_resume_equal_those_of_an_uninterrupted_run(small_data_root, tmp_path):
    """A kill after a checkpoint leaves records past it; resuming there must not log them twice."""
    args = _args(small_data_root, tmp_path, "once", "optim.epochs=3", "train.checkpoint_every=2",
                 "train.keep_checkpoints=20", "train.log_every=1")
    assert main(args) == 0
    uninterrupted = _records(tmp_path / "once")
    mid = tmp_path / "once" / "checkpoints" / "joint" / "step000000004"
    assert mid.is_dir()
    assert main(args + [f"train.resume={mid}"]) == 0
    assert _records(tmp_path / "once") == uninterrupted


def test_a_class_without_training_images_is_refused_like_the_data_check(small_data_root, tmp_path, caplog, capsys):
    root = tmp_path / "data"
    shutil.copytree(small_data_root, root)
    for image in (root / "train" / "colour" / "2").iterdir():
        image.unlink()
    assert main(_args(root, tmp_path, "empty", "optim.epochs=1", "data.shots=0")) == 2
    line = "task colour: 1 class(es) without train images: ['blue']"
    assert line in caplog.text
    assert main(["data", "check", f"data.root={root}", "data.shots=0"]) == 1
    assert line in capsys.readouterr().out
    shutil.copytree(small_data_root / "train" / "colour" / "2", root / "train" / "colour" / "2", dirs_exist_ok=True)
    for image in (root / "val" / "tone" / "1").iterdir():
        image.unlink()
    line = "task tone: 1 class(es) without val images: ['medium']"
    assert main(_args(root, tmp_path, "empty", "optim.epochs=1", "data.shots=0", "train.eval_split=val")) == 2
    assert main(["data", "check", f"data.root={root}", "data.shots=0", "train.eval_split=val"]) == 1
    assert line in caplog.text and line in capsys.readouterr().out


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_named_and_latest_stays_on_the_last_complete_checkpoint(small_data_root, small_disk, caplog):
    rc = main(_args(small_data_root, small_disk, "full", "optim.epochs=3", "train.checkpoint_every=1",
                    "train.keep_checkpoints=50"))
    assert rc == 1
    assert "no space left on device writing" in caplog.text and str(small_disk / "full" / "checkpoints") in caplog.text
    folder = small_disk / "full" / "checkpoints" / "joint"
    latest = (folder / "latest").read_text().strip()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir())[-1] == latest  # no partial tag left behind
    assert TrainingCheckpoints(folder, 50, {})._unreadable(folder / latest, _Engine()) is None


class _Engine:
    @staticmethod
    def state_classes():
        from softcpt_dist.training.engine import TrainEngine
        return TrainEngine.state_classes()


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for_boundedly(tmp_path, caplog):
    build = tmp_path / "some_op"
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.touch()
    os.utime(lock, (0, 0))  # old, and nobody works in the build folder: a killed build left it
    clear_stale_build_locks(tmp_path, wait_s=5)
    assert not lock.exists() and "removed the stale build lock" in caplog.text
    lock.touch()  # fresh: a build may be starting, so it is waited for, boundedly
    with pytest.raises(StaleBuildLock, match=str(lock)):
        clear_stale_build_locks(tmp_path, wait_s=2, min_age_s=60)


@pytest.mark.slow
def test_deepspeed_builds_in_the_installation_folder_and_survives_a_stale_lock(small_data_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    cli = [sys.executable, "-m", "softcpt_dist.cli"]
    setup = subprocess.run(cli + ["setup"], env=env, capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, setup.stderr[-2000:]
    assert str(extensions_dir()) in setup.stdout and str(extensions_dir()).startswith(sys.prefix)
    # A copy of the built op with the lock a killed build leaves: the next start must not hang.
    ext = tmp_path / "ext"
    shutil.copytree(extensions_dir(), ext)
    lock = next(p for p in ext.iterdir() if p.is_dir()) / "lock"
    lock.touch()
    os.utime(lock, (0, 0))
    run = subprocess.run(cli + _args(small_data_root, tmp_path, "lock", "optim.epochs=1"), capture_output=True,
                         text=True, timeout=300, env={**env, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "removed the stale build lock" in run.stderr


def test_a_lost_or_damaged_latest_marker_and_damaged_files_fall_back(small_data_root, tmp_path, caplog):
    args, folder, newest = _checkpointed_run(small_data_root, tmp_path, "lost")
    newest = newest.name
    (folder / "latest").unlink()  # lost: the newest complete tag is found, not a fresh start
    assert main(args + ["train.resume=latest"]) == 0
    assert "looking for the newest complete checkpoint" in caplog.text and f"{newest}: epoch" in caplog.text
    caplog.clear()
    _zero_middle(folder / newest / "train_state.pt")  # damaged bytes mid-file: unreadable, not "unsafe"
    (folder / "step000000002" / "rng_rank0.pt").unlink()  # and an older one that a rank never finished
    assert main(args + ["train.resume=latest"]) == 0
    assert "refusing" not in caplog.text and "lacks ['rng_rank0.pt']" in caplog.text
    assert "resuming from the older checkpoint step000000001" in caplog.text
    caplog.clear()
    (folder / "step000000001" / "mp_rank_00_model_states.pt").unlink()
    assert main(args + [f"train.resume={folder / 'step000000001'}"]) == 2
    assert "step000000001 lacks mp_rank_00_model_states.pt" in caplog.text  # named by the tag's manifest


def test_resuming_an_older_tag_by_another_spelling_of_its_path_discards_the_newer_ones(small_data_root, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _args(small_data_root, "runs", "rel", "optim.epochs=1", "train.checkpoint_every=1",
                 "train.keep_checkpoints=5")
    assert main(args) == 0
    folder = tmp_path / "runs" / "rel" / "checkpoints" / "joint"
    assert main(args + [f"train.resume={(folder / 'step000000001').resolve()}", "optim.lr=0.01"]) == 0
    latest = (folder / "latest").read_text().strip()
    assert latest == "step000000003-end"  # written again by the resumed run, not kept from the abandoned one
    assert torch.load(folder / latest / "train_state.pt", weights_only=True)["settings"]["optim.lr"] == 0.01


def test_damage_inside_tensor_data_is_found_by_the_checksums(small_data_root, tmp_path, caplog):
    """Zeroed bytes inside a tensor load without complaint; the tag's manifest of checksums finds them."""
    args, folder, newest = _checkpointed_run(small_data_root, tmp_path, "sum")
    states = newest / "mp_rank_00_model_states.pt"
    _zero_middle(states)
    torch.load(states, weights_only=True)  # still loads
    assert main(args + [f"train.resume={newest}"]) == 2
    assert "does not match its checksum" in caplog.text
    assert main(args + ["train.resume=latest"]) == 0
    assert "resuming from the older checkpoint step000000002" in caplog.text
