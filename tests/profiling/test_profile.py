"""softcpt-dist profile on the tiny model: its FLOP count equals a count by hand, its time split adds up
to the step time, MFU follows from --peak-tflops, --trace writes a Chrome trace, bad input is refused."""

import json
from pathlib import Path

import pytest

from softcpt_dist.cli import main
from softcpt_dist.model.prompt_layout import PromptBatch
from softcpt_dist.model.text_encoder import TextEncoder

REPO = Path(__file__).resolve().parents[2]
WARMUP, STEPS, BATCH = 1, 4, 8


def _args(root, out, *extra):
    return ["profile", "--config", str(REPO / "configs/synthetic.yaml"), f"data.root={root}", "data.shots=0",
            f"optim.batch_size={BATCH}", f"train.output_dir={out}", "train.progress=false", "--warmup", str(WARMUP),
            "--steps", str(STEPS), "--out", str(out / "profile"), *extra]


def _prefix_tree(source, length):
    """Token positions, attention pairs and features of a prompt batch, counted by brute force: the
    distinct prefixes (each encoded once), each attending its own length in keys."""
    prefixes = {tuple(source[p, : i + 1].tolist()) for p in range(len(length)) for i in range(int(length[p]))}
    return len(prefixes), sum(len(p) for p in prefixes), len(length)


@pytest.fixture(scope="module")
def profiled(small_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    seen = []
    original = TextEncoder.forward

    def recording(self, prompts, eot_positions=None):
        if isinstance(prompts, PromptBatch):
            seen.append(_prefix_tree(prompts.source.cpu(), prompts.length.cpu()))
        return original(self, prompts, eot_positions)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextEncoder, "forward", recording)
        assert main(_args(small_data_root, out, "--peak-tflops", "0.5", "--trace")) == 0
    return out / "profile", seen


def test_flops_equal_a_hand_count(profiled):
    folder, seen = profiled
    record = json.loads((folder / "profile.json").read_text())
    # softcpt-tiny (softcpt_dist/model/model_configs/softcpt-tiny.json): text 2 layers of width 128 (MLP 4x),
    # embed 64; vision ViT 32 px, patch 8 (16 patches + CLS = 17 tokens), 2 layers of width 128.
    d, layers, embed, n_ctx = 128, 2, 64, 16
    block_weights = layers * (3 * d * d + d * d + 2 * 4 * d * d)
    calls_per_step = len(seen) // (WARMUP + STEPS)
    assert calls_per_step * (WARMUP + STEPS) == len(seen) and calls_per_step >= 2  # task prompts + class prompts
    positions = sum(p for p, _, _ in seen[:calls_per_step])
    pairs = sum(a for _, a, _ in seen[:calls_per_step])
    features = sum(f for _, _, f in seen[:calls_per_step])
    parts = record["flops_by_part"]
    assert parts["text_forward"] == 2 * block_weights * positions + 4 * d * layers * pairs + 2 * d * embed * features
    assert parts["text_backward"] == 2 * block_weights * positions + 8 * d * layers * pairs + 2 * d * embed * features
    tasks, classes = 4, 13  # the built-in dataset
    meta = 2 * tasks * embed * n_ctx * d  # one bias-free linear layer per task feature
    assert parts["meta_net_forward"] == meta and parts["meta_net_backward"] == 2 * meta  # weight + input gradients
    assert parts["head_forward"] == parts["head_backward"] == 2 * BATCH * classes * embed
    tokens, vision_d = 17, 128
    image = (2 * 16 * vision_d * 3 * 8 * 8 + layers * (2 * tokens * 12 * vision_d ** 2 + 4 * tokens ** 2 * vision_d)
             + 2 * vision_d * embed)
    assert parts["image_forward"] == BATCH * image and parts["image_backward"] == 0
    assert record["flops_per_step"] == sum(parts.values())
    assert record["text_positions_per_step"] == [positions]


def test_split_adds_up_and_throughput_follows(profiled):
    folder, _ = profiled
    record = json.loads((folder / "profile.json").read_text())
    step = record["step_ms"]["median"]
    assert abs(record["split_sum_ms"] - step) <= 0.10 * step, (record["split_ms"], step)
    assert all(record["split_ms"][p]["median"] > 0 for p in ("image", "text_forward", "backward", "optimizer"))
    assert record["steps"] == STEPS and record["config"]["samples_per_step"] == BATCH
    assert record["samples_per_s"] == pytest.approx(BATCH / (step / 1e3))
    achieved = record["flops_per_step"] / (step / 1e3) / 1e12
    assert record["achieved_tflops_per_rank"] == pytest.approx(achieved)
    assert record["peak_source"] == "--peak-tflops" and record["mfu"] == pytest.approx(achieved / 0.5)
    assert record["peak_memory_bytes"][0] > 0 and record["environment"]["versions"]["torch"]
    predictions = record["cost_model"]["predictions"]
    assert [p["world_size"] for p in predictions][:3] == [1, 2, 4]
    assert predictions[0]["step_s"] == pytest.approx(step / 1e3, rel=0.2)
    text = (folder / "profile.md").read_text()
    assert "| text_forward |" in text and "MFU" in text and (folder / "config.yaml").is_file()


def test_trace_holds_the_phases(profiled):
    folder, _ = profiled
    trace = json.loads((folder / "trace_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"text_forward", "backward", "optimizer"} <= names


@pytest.mark.parametrize("extra, message", [(["--steps", "0"], "--steps"),
                                            (["method.name=zeroshot"], "trains no prompts")])
def test_bad_settings_are_refused(small_data_root, tmp_path, caplog, extra, message):
    assert main(_args(small_data_root, tmp_path, *extra)) == 2
    assert message in caplog.text
    assert not (tmp_path / "profile").exists()
