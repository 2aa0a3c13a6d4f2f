"""Frozen image-feature cache: same metrics as reading images, keyed by weights, views, ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from softcpt_dist.model.backbone import build_backbone
from softcpt_dist.config import ModelConfig, load_config
from softcpt_dist.data.features import FeatureCache
from softcpt_dist.data.transforms import eval_transform, train_transform
from softcpt_dist.training.experiment import run_train
from softcpt_dist.model.loss import multitask_cross_entropy
from softcpt_dist.model import build_method
from softcpt_dist.model import PromptClassifier
from softcpt_dist.training.loop import batch_classes


def _cfg(tmp_path, root, name, *extra):
    return load_config([], [f"data.root={root}", "data.shots=4", "optim.epochs=3", "optim.lr=0.05",
                            "optim.batch_size=8", "data.train_augment=none", f"train.output_dir={tmp_path}",
                            f"train.run_name={name}", "train.progress=false", f"data.cache.dir={tmp_path / 'cache'}",
                            *extra])


@pytest.mark.slow
@pytest.mark.parametrize("method", [["method.variant=NATA"], ["method.name=coop", "method.coop_mode=CA"],
                                    ["method.name=linear_probe", "method.lp_search_steps=1", "method.lp_max_iter=100"], ["method.name=zeroshot"]])
def test_training_and_eval_from_cache_match_images(tmp_path, small_data_root, method):
    plain = run_train(_cfg(tmp_path, small_data_root, "plain", *method))
    cached = run_train(_cfg(tmp_path, small_data_root, "cached", "data.cache.enabled=true", *method))
    assert cached.results["tasks"] == plain.results["tasks"]
    for a, b in zip(plain.history, cached.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    assert list((tmp_path / "cache").glob("*/meta.json"))


@pytest.mark.slow
def test_cache_entries_are_reused_not_recomputed(tmp_path, small_data_root):
    run_train(_cfg(tmp_path, small_data_root, "first", "data.cache.enabled=true"))
    entries = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/*.pt")}
    assert len(entries) == 2  # train and test features of one model
    run_train(_cfg(tmp_path, small_data_root, "second", "data.cache.enabled=true", "optim.lr=0.01"))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/*.pt")} == entries


def test_cache_key_follows_weights_and_preprocessing(tmp_path, tiny_backbone):
    torch.manual_seed(123)
    other = build_backbone(ModelConfig(arch="softcpt-tiny"))
    a = FeatureCache(tmp_path, tiny_backbone, "fp32")
    assert FeatureCache(tmp_path, tiny_backbone, "fp32").dir == a.dir
    assert FeatureCache(tmp_path, other, "fp32").dir != a.dir  # other random init, other entries
    resnet = build_backbone(ModelConfig(arch="softcpt-tiny-rn"))  # BatchNorm: 0-dim buffers
    assert FeatureCache(tmp_path, resnet, "fp32").dir != a.dir
    tiny_backbone.preprocess_cfg = {**tiny_backbone.preprocess_cfg, "interpolation": "bilinear"}
    try:
        assert FeatureCache(tmp_path, tiny_backbone, "fp32").dir != a.dir
    finally:
        tiny_backbone.preprocess_cfg = {**tiny_backbone.preprocess_cfg, "interpolation": "bicubic"}


def test_augmented_views_are_deterministic_and_distinct(tmp_path, tiny_backbone, small_data):
    samples = small_data.splits["train"][:10]
    tf = train_transform(tiny_backbone.preprocess_cfg, "paper")
    feats = FeatureCache(tmp_path / "a", tiny_backbone, "fp32", batch_size=3).features(samples, tf, views=3, seed=1)
    assert feats.shape[:2] == (10, 3)
    assert not torch.allclose(feats[:, 0], feats[:, 1])
    again = FeatureCache(tmp_path / "b", tiny_backbone, "fp32", batch_size=7).features(samples, tf, views=3, seed=1)
    assert torch.allclose(feats, again, atol=1e-5)  # independent of batch size
    reordered = FeatureCache(tmp_path / "b", tiny_backbone, "fp32").features(samples[::-1], tf, views=3, seed=1)
    assert torch.equal(reordered, again.flip(0))
    plain = FeatureCache(tmp_path / "a", tiny_backbone, "fp32").features(samples, eval_transform(tiny_backbone.preprocess_cfg))
    assert plain.shape == (10, feats.shape[-1])


@pytest.mark.slow
def test_training_from_cached_views(tmp_path, small_data_root):
    result = run_train(_cfg(tmp_path, small_data_root, "views", "data.cache.enabled=true", "data.train_augment=paper",
                            "data.cache.train_views=2"))
    assert all(r["loss"] == r["loss"] for r in result.history)
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == 2  # train views + test features


def test_grouped_micro_batch_loss_equals_full_loss(tiny_backbone, small_data):
    cfg = load_config([], [])
    group = small_data.group
    model = PromptClassifier(tiny_backbone, build_method(tiny_backbone, group, cfg.method, cfg.prompt))
    torch.manual_seed(0)
    feats = torch.randn(6, tiny_backbone.embed_dim)
    tasks, labels = torch.tensor([1, 3, 1, 3, 3, 1]), torch.tensor([0, 2, 2, 1, 0, 1])
    class_task = group.class_task()
    targets = group.global_labels(tasks, labels)
    full = multitask_cross_entropy(model(feats), tasks, targets, class_task)
    index = batch_classes(group, tasks)
    assert index.tolist() == list(range(5, 8)) + list(range(10, 13))
    position = torch.full((group.num_classes,), -1)
    position[index] = torch.arange(len(index))
    sub = multitask_cross_entropy(model(feats, class_index=index), tasks, position[targets], class_task[index])
    assert sub.item() == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.slow
def test_training_with_task_grouped_batches_learns(tmp_path, small_data_root):
    result = run_train(_cfg(tmp_path, small_data_root, "grouped", "data.sampler.tasks_per_batch=1", "optim.epochs=12",
                            "data.shots=0"))
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_training_with_balanced_and_temperature_sampling(tmp_path, small_data_root):
    for mode in ("balanced", "temperature"):
        result = run_train(_cfg(tmp_path, small_data_root, mode, f"data.sampler.mode={mode}", "optim.epochs=2",
                                "data.sampler.tasks_per_batch=2"))
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def _encode_on_rank(rank, world, port, cache_dir, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        backbone = build_backbone(ModelConfig(arch="softcpt-tiny"))
        from softcpt_dist.data import read_task_folders
        samples = read_task_folders(root).splits["test"]
        cache = FeatureCache(cache_dir, backbone, "fp32", batch_size=4)
        feats = cache.features(samples, eval_transform(backbone.preprocess_cfg))
        torch.save(feats, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_encode_disjoint_parts_and_match_one_rank(tmp_path, small_data_root, small_data):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_encode_on_rank, args=(2, port, str(tmp_path / "multi"), str(small_data_root), str(tmp_path / "f")),
             nprocs=2, join=True)
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(arch="softcpt-tiny"))
    single = FeatureCache(tmp_path / "single", backbone, "fp32").features(
        small_data.splits["test"], eval_transform(backbone.preprocess_cfg))
    for rank in range(2):
        assert torch.allclose(torch.load(f"{tmp_path / 'f'}.{rank}"), single, atol=1e-5)
    assert not list((tmp_path / "multi").glob("*/*.part*"))  # parts merged and removed


def test_image_replaced_in_place_is_a_new_entry(tmp_path, tiny_backbone):
    from softcpt_dist.data.dataset import Sample
    from PIL import Image
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    tf = eval_transform(tiny_backbone.preprocess_cfg)
    cache = FeatureCache(tmp_path / "cache", tiny_backbone, "fp32")
    red = cache.features([Sample(str(img), 0, 0)], tf)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(img)
    os.utime(img, ns=(1, 10**18))  # a different modification time even on coarse-clock file systems
    blue = cache.features([Sample(str(img), 0, 0)], tf)
    fresh = FeatureCache(tmp_path / "other", tiny_backbone, "fp32").features([Sample(str(img), 0, 0)], tf)
    assert not torch.allclose(red, blue) and torch.allclose(blue, fresh)
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == 2
    assert not list((tmp_path / "cache").glob("*/*.tmp"))
