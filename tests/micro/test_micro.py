"""The micro world: scenes, held-out combinations, captions, its few-shot group, and the micro CLIP's
pre-training, caching and loading through the ordinary weights path."""

import json
import random

import pytest
import torch

from softcpt_dist.cli import main
from softcpt_dist.config import ConfigError, DataConfig, ModelConfig, load_config
from softcpt_dist.data.loading import ensure_builtin_data, read_dataset
from softcpt_dist.data.tasks import DataError
from softcpt_dist.micro.group import TASKS, write_group
from softcpt_dist.micro.pretrain import WorldText, micro_clip, scene_batch, weights_path
from softcpt_dist.config import MicroGroupConfig, MicroPretrainConfig
from softcpt_dist.micro.world import (ATTRIBUTES, MENTION, Camera, caption, held_out, render, render_batch,
                                      sample_scene)
from softcpt_dist.model.backbone import build_backbone

TINY_PRETRAIN = dict(steps=3, batch_size=8, warmup_steps=1, log_every=1)


def test_world_has_seven_attributes_of_three_to_ten_values():
    assert len(ATTRIBUTES) >= 6
    assert all(3 <= len(v) <= 10 for v in ATTRIBUTES.values())
    assert [t.key for t in TASKS] == [a for a in ATTRIBUTES if a != "shape"]


def test_held_out_combinations_are_a_quarter_and_every_pair_is_seen():
    rng = random.Random(0)
    seen = [sample_scene(rng) for _ in range(3000)]
    novel = [sample_scene(rng, novel=True) for _ in range(300)]
    assert not any(held_out(s) for s in seen) and all(held_out(s) for s in novel)
    pairs = {(s["shape"], s["colour"]) for s in seen} | {(s["colour"], s["background"]) + (None,) for s in seen}
    assert len(pairs) == 6 * 6 + 6 * 4  # pre-training still shows every pair of values
    fixed = sample_scene(rng, novel=True, fixed={"count": 2, "shape": 1})
    assert fixed["count"] == 2 and fixed["shape"] == 1 and held_out(fixed)


def test_render_is_deterministic_and_seed_dependent():
    scene = sample_scene(random.Random(1))
    a, b, c = render(scene, "k"), render(scene, "k"), render(scene, "other")
    assert a.dtype == torch.uint8 and a.shape == (3, 64, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_batch_renders_each_scene_exactly_as_alone_whatever_the_thread_count():
    rng = random.Random(4)
    scenes = [sample_scene(rng) for _ in range(12)]
    seeds = [f"b{i}" for i in range(12)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = render_batch(scenes, seeds, camera=Camera(zoom=1.2))
        torch.set_num_threads(2)
        two = render_batch(scenes, seeds, camera=Camera(zoom=1.2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # exact arithmetic only: the same pixels on every CPU and thread count
    for i in (0, 5, 11):
        assert torch.equal(one[i], render(scenes[i], seeds[i], camera=Camera(zoom=1.2)))
    assert torch.equal(render_batch(scenes[3:5], seeds[3:5]), render_batch(scenes, seeds)[3:5])


def test_the_group_camera_zooms_in_and_casts_colour_and_the_identity_camera_changes_nothing():
    scene = {a: 0 for a in ATTRIBUTES} | {"colour": 0, "background": 0, "pattern": 0}  # one red circle on plain black
    plain = render(scene, "k")
    assert torch.equal(render(scene, "k", camera=Camera()), plain)  # pre-training's images are unchanged
    area = (plain[0].float() > 120).sum()
    zoomed = (render(scene, "k", camera=Camera(zoom=1.4))[0].float() > 120).sum()
    assert 1.6 < zoomed / area < 2.4  # ~1.4 ** 2
    cast = render(scene, "k", camera=Camera(colour_gain=(1.0, 1.0, 0.5))).float()
    assert torch.allclose(cast[:2].mean(), plain[:2].float().mean(), atol=0.5)
    assert cast[2].mean() < 0.6 * plain[2].float().mean()
    with pytest.raises(ValueError, match="camera"):
        Camera(zoom=0)
    for bad in ("data.micro.zoom=0", "data.micro.colour_gain=[1,1]", "data.micro.colour_gain=[1,0,1]"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config([], [bad])


def test_captions_name_only_the_scenes_values():
    rng = random.Random(2)
    for _ in range(200):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        words = set(text.rstrip(".").split())
        for attribute, values in ATTRIBUTES.items():
            wrong = {v for i, v in enumerate(values) if i != scene[attribute]} - {"one"}
            assert not (wrong & words), (text, attribute)
            if attribute == "shape":  # plural nouns
                assert not ({v + "s" for v in wrong} & words), text


def test_captions_name_the_spatial_attributes_most_and_shape_never():
    rng = random.Random(3)
    named = {a: 0 for a in ATTRIBUTES}
    scenes = [sample_scene(rng) for _ in range(2000)]
    for scene in scenes:
        text = caption(scene, rng)
        named["shape"] += any(w.rstrip("s") in ATTRIBUTES["shape"] for w in text.rstrip(".").split())
        for attribute in ("size", "colour", "pattern"):
            named[attribute] += ATTRIBUTES[attribute][scene[attribute]] in text.split()
        named["position"] += any(w in text for w in ("left", "middle", "centre", "right"))
    assert named["shape"] == 0
    for attribute in ("size", "colour", "pattern", "position"):
        assert abs(named[attribute] / len(scenes) - MENTION[attribute]) < 0.05, (attribute, named)
    forced = caption(sample_scene(rng, fixed={"position": 2}), rng, said=["position"])
    assert "right" in forced and not any(c in forced for c in ATTRIBUTES["colour"])


def test_world_text_is_encode_text_and_its_tokenizer_the_clip_tokenizer(tmp_path):
    import open_clip

    from softcpt_dist.model.backbone import ensure_builtin_configs

    ensure_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("softcpt-micro", pretrained=None)
    tokenizer = open_clip.get_tokenizer("softcpt-micro")
    text = WorldText(model, tokenizer)
    images, tokens = scene_batch(0, 0, 16, text.tokenize)
    assert images.shape == (16, 3, 64, 64)
    rng = random.Random(0)
    captions = [caption(sample_scene(rng), rng) for _ in range(16)]
    assert torch.equal(text.tokenize(captions), tokenizer(captions))
    with torch.no_grad():
        text.rows.add_(0.1)  # trained rows differ from the model's own until written back
        text.write_back()
        full = model.encode_text(tokens)
        assert (text(tokens) - full).abs().max() < 2e-6  # fp32 rounding: the cut only drops padding
    with pytest.raises(ValueError, match="vocabulary"):
        text(tokenizer(["a photo of a dog."]))
    with pytest.raises(ValueError, match="lower-case"):
        text.tokenize(["A Red object."])


SMALL_GROUP = MicroGroupConfig(train_per_class=2, val_per_class=1, test_per_class=2, seed=5)


def test_group_is_written_in_the_task_folders_layout_and_read_back(tmp_path):
    cfg = DataConfig(dataset="micro", root=str(tmp_path / "group"), shots=0, micro=SMALL_GROUP)
    ensure_builtin_data(cfg)
    data = read_dataset(cfg)
    assert [t.key for t in data.group.tasks] == [t.key for t in TASKS]
    assert len(data.splits["test"]) == 2 * sum(t.num_classes for t in TASKS)
    first = sorted((tmp_path / "group" / "test").rglob("*.png"))[0].read_bytes()
    ensure_builtin_data(cfg)  # there already: kept as it is
    assert sorted((tmp_path / "group" / "test").rglob("*.png"))[0].read_bytes() == first


def test_group_folder_of_other_settings_or_data_is_refused(tmp_path, small_data_root):
    write_group(tmp_path / "group", SMALL_GROUP)
    for other in (MicroGroupConfig(train_per_class=3, val_per_class=1, test_per_class=2, seed=5),
                  MicroGroupConfig(train_per_class=2, val_per_class=1, test_per_class=2, seed=5, zoom=1.0)):
        with pytest.raises(DataError, match="data.root=.*micro group made with"):
            ensure_builtin_data(DataConfig(dataset="micro", root=str(tmp_path / "group"), micro=other))
    with pytest.raises(DataError, match="not a micro group"):
        ensure_builtin_data(DataConfig(dataset="micro", root=str(small_data_root)))


def test_micro_clip_is_pretrained_once_then_loaded_as_ordinary_weights(tmp_path):
    cfg = MicroPretrainConfig(dir=str(tmp_path), **TINY_PRETRAIN)
    path = micro_clip("softcpt-micro", cfg, show_progress=False)
    assert path == weights_path("softcpt-micro", cfg) and path.is_file()
    record = json.loads(path.with_suffix(".json").read_text())
    assert [p["step"] for p in record["curve"]] == [1, 2, 3] and record["arch"] == "softcpt-micro"
    stamp = path.stat().st_mtime_ns
    assert micro_clip("softcpt-micro", cfg, show_progress=False) == path and path.stat().st_mtime_ns == stamp
    state = torch.load(path, weights_only=True)
    backbone = build_backbone(ModelConfig(arch="softcpt-micro", pretrained="micro", micro=cfg))
    loaded = build_backbone(ModelConfig(arch="softcpt-micro", pretrained=str(path)))
    for name, tensor in backbone.text_encoder.state_dict().items():
        assert torch.equal(tensor, loaded.text_encoder.state_dict()[name]), name
    assert torch.equal(backbone.token_embedding.weight, state["token_embedding.weight"])
    # Other settings, other file: a change never reuses stale weights.
    assert weights_path("softcpt-micro", MicroPretrainConfig(dir=str(tmp_path), steps=4)) != path
    assert weights_path("softcpt-micro", MicroPretrainConfig(dir="elsewhere", log_every=7)).name == \
        weights_path("softcpt-micro", MicroPretrainConfig()).name


def test_pretrain_micro_command_prints_the_cached_file(tmp_path, capsys):
    overrides = [f"model.micro.{k}={v}" for k, v in TINY_PRETRAIN.items()] + [f"model.micro.dir={tmp_path}",
                                                                              "train.progress=false"]
    assert main(["pretrain-micro", *overrides]) == 0
    printed = capsys.readouterr().out.strip()
    cfg = load_config([], ["model.arch=softcpt-micro", *overrides])
    assert printed == str(weights_path("softcpt-micro", cfg.model.micro))
