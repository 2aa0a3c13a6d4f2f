"""The DeepSpeed engine in one process: activation checkpointing, non-finite losses, checkpoint checks."""

import json

import pytest
import torch

from softcpt_dist.model import loss as task_loss  # the loss dispatcher: its torch path is patched below
from softcpt_dist import seeding
from softcpt_dist.cli import main
from softcpt_dist.config import ConfigError, load_config
from softcpt_dist.training.engine import SHM_OP, deepspeed_config, micro_batch_size, no_shm_op_for_one_rank
from softcpt_dist.model.loss import multitask_cross_entropy
from softcpt_dist.model import build_method
from softcpt_dist.model import PromptClassifier


def _args(root, out, name, *extra):
    return ["train", f"data.root={root}", "data.shots=2", "data.train_augment=none", "optim.batch_size=8",
            "optim.epochs=2", f"train.output_dir={out}", f"train.run_name={name}", "train.progress=false", *extra]


@pytest.mark.parametrize("variant", ["NATA", "CSTS"])
def test_activation_checkpointing_gives_the_same_gradients(tiny_backbone, small_data, variant):
    cfg = load_config([], [f"method.variant={variant}"])
    group = small_data.group
    torch.manual_seed(0)
    model = PromptClassifier(tiny_backbone, build_method(tiny_backbone, group, cfg.method, cfg.prompt))
    feats = torch.randn(5, tiny_backbone.embed_dim)
    tasks, labels = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([4, 2, 1, 0, 3])
    grads = []
    for enabled in (False, True):
        tiny_backbone.set_grad_checkpointing(enabled)
        try:
            model.zero_grad()
            loss = multitask_cross_entropy(model(feats), tasks, group.global_labels(tasks, labels), group.class_task())
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.learnable_parameters().items()})
        finally:
            tiny_backbone.set_grad_checkpointing(False)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8)


def test_global_batch_is_split_over_ranks_and_accumulation():
    cfg = load_config([], ["optim.batch_size=32", "engine.grad_accum_steps=2", "engine.zero_stage=3",
                           "engine.deepspeed={zero_optimization: {overlap_comm: true}, gradient_clipping: 0.5}"])
    assert micro_batch_size(cfg.optim, cfg.engine, 4) == 4
    ds = deepspeed_config(cfg.engine, 4, 4)
    assert ds["train_batch_size"] == 32 and ds["zero_optimization"] == {"stage": 3, "overlap_comm": True,
                                                                   "memory_efficient_linear": False}
    assert ds["gradient_clipping"] == 0.5  # raw DeepSpeed keys win
    # ZeRO's gradient buckets hold the learnable elements at once, not DeepSpeed's 5e8 (raw keys still win).
    sized = deepspeed_config(cfg.engine, 4, 4, learnable=12_345)["zero_optimization"]
    assert sized == {"stage": 3, "overlap_comm": True, "memory_efficient_linear": False,
                     "reduce_bucket_size": 12_345, "allgather_bucket_size": 12_345}
    raw = load_config([], ["engine.zero_stage=2", "engine.deepspeed={zero_optimization: {reduce_bucket_size: 7}}"])
    assert deepspeed_config(raw.engine, 2, 4, learnable=10**9)["zero_optimization"] == {
        "stage": 2, "memory_efficient_linear": False, "reduce_bucket_size": 7, "allgather_bucket_size": 500_000_000}
    assert "reduce_bucket_size" not in deepspeed_config(load_config().engine, 1, 4, learnable=10)["zero_optimization"]
    with pytest.raises(ConfigError, match="not divisible by world_size x engine.grad_accum_steps = 3 x 2"):
        micro_batch_size(cfg.optim, cfg.engine, 3)


def _nan_after(n):
    calls = {"n": 0}

    def loss_fn(*args, **kwargs):
        calls["n"] += 1
        loss = multitask_cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["n"] > n else loss
    return loss_fn


def test_non_finite_loss_stops_without_touching_checkpoints(small_data_root, tmp_path, monkeypatch):
    assert main(_args(small_data_root, tmp_path, "nan", "train.checkpoint_every=1")) == 0
    ckpts = tmp_path / "nan" / "checkpoints" / "joint"
    before = (ckpts / "latest").read_text()
    monkeypatch.setattr(task_loss, "multitask_cross_entropy", _nan_after(1))
    assert main(_args(small_data_root, tmp_path, "nan", "train.checkpoint_every=1", "optim.epochs=4",
                      "train.resume=latest")) == 1
    after = (ckpts / "latest").read_text()
    # The finite step after resuming was checkpointed; nothing after the NaN was.
    assert int(after.strip()[4:13]) == int(before.strip()[4:13]) + 1


def test_non_finite_steps_can_be_skipped(small_data_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(task_loss, "multitask_cross_entropy", _nan_after(3))
    assert main(_args(small_data_root, tmp_path, "skip", "train.on_nonfinite=skip")) == 0
    assert "step(s) with a non-finite loss were skipped" in caplog.text


def test_resume_refuses_a_checkpoint_of_another_method_or_engine(small_data_root, tmp_path, caplog):
    assert main(_args(small_data_root, tmp_path, "mm", "optim.epochs=1")) == 0
    assert main(_args(small_data_root, tmp_path, "mm", "optim.epochs=1", "method.variant=NATS",
                      "train.resume=latest")) == 2
    assert "was made for method='softcpt-NATA', this run has method='softcpt-NATS'" in caplog.text
    assert main(_args(small_data_root, tmp_path, "mm", "optim.epochs=1", "engine.zero_stage=2",
                      "train.resume=latest")) == 2
    assert "was made with zero_stage=0, this run has zero_stage=2" in caplog.text
    with pytest.raises(ConfigError, match="train.resume needs train.run_name"):
        load_config([], ["train.resume=latest"])


def test_methods_refuse_what_they_cannot_honour_before_writing(small_data_root, tmp_path, caplog):
    assert main(_args(small_data_root, tmp_path, "pg", "method.name=prograd", "prompt.n_ctx=4",
                      "engine.zero_stage=1")) == 2
    assert "method.name=prograd projects each learnable tensor's whole reduced gradient: it needs " \
           "engine.zero_stage=0 (it is 1" in caplog.text
    assert not (tmp_path / "pg").exists()
    assert main(_args(small_data_root, tmp_path, "plot", "method.name=plot", "data.cache.enabled=true")) == 2
    assert "method.name=plot matches prompts to every image position's feature" in caplog.text
    assert not (tmp_path / "plot").exists()


def test_keep_last_n_checkpoints_and_memory_report(small_data_root, tmp_path):
    assert main(_args(small_data_root, tmp_path, "keep", "train.checkpoint_every=1", "train.keep_checkpoints=2")) == 0
    ckpts = tmp_path / "keep" / "checkpoints" / "joint"
    tags = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    assert len(tags) == 2 and (ckpts / "latest").read_text().strip() == tags[-1]
    memory = json.loads((tmp_path / "keep" / "memory_joint.json").read_text())
    assert memory["ranks"][0]["frozen_param_bytes"] > 0 and memory["ranks"][0]["learnable_param_bytes"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_clip_trains_with_fp32_prompts(small_data_root, tmp_path, precision):
    assert main(_args(small_data_root, tmp_path, precision, f"model.precision={precision}", "optim.epochs=1",
                      "engine.activation_checkpointing=true")) == 0
    weights = torch.load(tmp_path / precision / "prompt_checkpoint.pt", weights_only=True)["states"]["joint"]
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save(seeding.rng_state(), tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), torch.rand(1).item())
    seeding.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first


def test_a_fresh_run_under_an_old_name_drops_its_checkpoints(small_data_root, tmp_path):
    assert main(_args(small_data_root, tmp_path, "again", "optim.epochs=1")) == 0
    old = (tmp_path / "again" / "checkpoints" / "joint" / "latest").read_text()
    state = tmp_path / "again" / "checkpoints" / "joint" / old.strip() / "train_state.pt"
    before = state.stat().st_mtime_ns
    assert main(_args(small_data_root, tmp_path, "again", "optim.epochs=1", "optim.lr=0.5")) == 0
    assert state.stat().st_mtime_ns != before  # written by the new run, not kept from the old one


def test_one_rank_starts_deepspeed_without_building_its_shared_memory_op():
    """One process has no peer: DeepSpeed's shared-memory collective (a 30 s JIT build on a fresh machine)
    is marked unavailable while its backend starts, and restored after; several ranks keep it."""
    import types
    fake = types.SimpleNamespace(ops=types.SimpleNamespace(__compatible_ops__={SHM_OP: True}))
    with no_shm_op_for_one_rank(fake, world_size=1):
        assert fake.ops.__compatible_ops__[SHM_OP] is False
    assert fake.ops.__compatible_ops__[SHM_OP] is True
    with no_shm_op_for_one_rank(fake, world_size=2):
        assert fake.ops.__compatible_ops__[SHM_OP] is True
    from softcpt_dist.training.engine import import_deepspeed
    assert SHM_OP in import_deepspeed().ops.__compatible_ops__  # the name DeepSpeed uses today
