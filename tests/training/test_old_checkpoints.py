"""Checkpoints written by the code before the package layout changed (commit 293c017) still load.

``tests/fixtures/old_run_293c017.tar.gz`` is a run folder made by that code
(``tests/fixtures/make_old_run.py``: SoftCPT NATA, tiny CLIP, the small synthetic data of
conftest.py, 2 epochs): its prompt checkpoint, both end-of-epoch training checkpoints, its
config.yaml, metrics and results.
"""

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from softcpt_dist.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_run_293c017.tar.gz"
OLD_ARGS = ["data.shots=2", "prompt.n_ctx=4", "optim.batch_size=8", "optim.epochs=2", "optim.lr=0.05",
            "train.progress=false", "train.keep_checkpoints=2"]


@pytest.fixture
def old_run(tmp_path):
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path / "runs", filter="data")
    return tmp_path / "runs" / "old"


def _states(path):
    return torch.load(path, map_location="cpu", weights_only=True)["states"]


def test_old_prompt_checkpoint_evaluates_to_the_old_results(old_run, small_data_root):
    assert main(["eval", "--run", str(old_run), f"data.root={small_data_root}", "train.progress=false"]) == 0
    old = json.loads((old_run / "results.json").read_text())
    new = json.loads((old_run / "eval_test.json").read_text())
    assert new["tasks"] == old["tasks"] and new["mean"] == old["mean"]


def test_old_training_checkpoint_resumes_to_the_old_final_weights(old_run, small_data_root):
    """Resuming the old run after its first epoch retrains epoch 2 to the same weights and loss (within fp32
    rounding: the old code encoded text with open_clip's attention, ours sums in another order)."""
    final = _states(old_run / "prompt_checkpoint.pt")
    old_epochs = [json.loads(r) for r in (old_run / "metrics.jsonl").read_text().splitlines()]
    shutil.copy(old_run / "prompt_checkpoint.pt", old_run.parent / "final.pt")
    first_epoch = old_run / "checkpoints" / "joint" / "step000000003-end"
    assert main(["train", f"data.root={small_data_root}", f"train.output_dir={old_run.parent}",
                 "train.run_name=old", f"train.resume={first_epoch}", *OLD_ARGS]) == 0
    resumed = _states(old_run / "prompt_checkpoint.pt")
    assert resumed.keys() == final.keys()
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=1e-4, atol=1e-6)
    new_epochs = [json.loads(r) for r in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert new_epochs[-1]["epoch"] == 2 and new_epochs[-1]["loss"] == pytest.approx(old_epochs[-1]["loss"], rel=1e-5)


def test_old_checkpoints_refuse_another_setup_by_name(old_run, small_data_root, caplog):
    assert main(["eval", "--run", str(old_run), f"data.root={small_data_root}", "prompt.n_ctx=8",
                 "train.progress=false"]) == 2
    assert "prompt setting n_ctx=4" in caplog.text and "prompt_checkpoint.pt" in caplog.text
    latest = old_run / "checkpoints" / "joint" / "latest"
    assert main(["train", f"data.root={small_data_root}", f"train.output_dir={old_run.parent}",
                 "train.run_name=old", "train.resume=latest", *OLD_ARGS, "optim.name=adamw"]) == 2
    assert "optimizer='sgd'" in caplog.text and latest.read_text().strip() == "step000000006-end"
