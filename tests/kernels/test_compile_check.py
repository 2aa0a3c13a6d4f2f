"""The kernels compiled for real GPU targets (sm_80 ... sm_100) without a GPU: the launches that bound each
kernel's resources pass (no compile error, shared memory within each target's limit, spills within the
bounds, warpgroup MMA for 16-bit products on sm_90), and the check catches what it is there to catch."""

import pytest
import torch

from softcpt_dist.kernels import compile_check as check
from softcpt_dist.kernels.launch import SHARED_MEMORY_LIMIT, AttentionLaunch, Tiles, attention_launch


def test_tower_shapes_are_open_clips():
    import open_clip

    for name, (width, heads, embed) in check.TOWERS.items():
        text = open_clip.get_model_config(name)["text_cfg"]
        assert (text["width"], text["heads"], open_clip.get_model_config(name)["embed_dim"]) == (width, heads, embed)


def test_launches_cover_every_kernel_and_dtype():
    launches = check.launches_for(90)
    kernels = {launch.kernel for launch in launches}
    assert kernels == {"shared_prefix_attention:_query_tile", "shared_prefix_attention:_key_tile",
                       "cosine_ce:_sample_tile", "cosine_ce:_class_tile", "prompt_assembly:_assemble",
                       "prompt_assembly:_segment_sum"}
    assert {launch.dtype for launch in launches} == set(check.DTYPES)
    heads = {launch.constexprs.get("HEAD_DIM") for launch in launches} - {None}
    assert heads == {64, 80, 128}
    # launches equal in all that compiles are merged, their shapes listed: ViT-B/L/H/bigG share head dim 64
    query = [launch for launch in launches if launch.kernel.endswith("_query_tile") and launch.dtype == "fp32"
             and launch.constexprs["HEAD_DIM"] == 64 and not launch.constexprs["BACKWARD"]]
    assert len(query) == 1 and query[0].shape.split(", ") == list(check.TOWERS)


@pytest.mark.slow
def test_bounding_launches_compile_within_every_targets_limits():
    targets, unknown = check.known_targets(check.TARGETS)
    assert {80, 86, 89, 90} <= set(targets), unknown
    results = check.run_check(targets, bounding=True, jobs=2)
    assert not [r for r in results if r.problems], check.summary(results)
    wide_on_hopper = [r for r in results if r.target == 90 and r.dtype != "fp32"
                      and ("warpgroup" in r.variant or r.kernel.startswith("cosine_ce"))]
    assert len(wide_on_hopper) > 20 and all(r.mma == "wgmma" for r in wide_on_hopper)
    assert all(r.spill_stores == 0 for r in results if r.dtype != "fp32")
    assert max(r.spill_stores for r in results) <= check.SPILL_BOUND["fp32"]


def _former_key_tile(target):
    """The key kernel as every GPU launched it before per-target settings: fp32, head dim 128, 32 x 32, 4 warps."""
    launches = check.attention_launches("fp32", 128, 1024, 8, "head dim 128", target)
    key = launches[-1]
    key.constexprs.update(BLOCK_M=32, BLOCK_N=32)
    key.options = dict(num_warps=4, num_stages=3)
    return key


@pytest.mark.slow
def test_the_check_finds_shared_memory_overflow_and_spills():
    """The former fp32 key tile (102,912 B of shared memory, kB of spills) fails on sm_89; a launch that does
    not compile is reported, not raised."""
    key = _former_key_tile(89)
    broken = _former_key_tile(89)
    broken.constexprs.update(BLOCK_D=96)  # not a power of two: Triton refuses it
    result, failed = check.compile_all([(key, 89), (broken, 89)], jobs=2)
    found = check.problems(result, key)
    assert result.shared > SHARED_MEMORY_LIMIT[89]
    assert any("shared memory" in p for p in found) and any("spill" in p for p in found)
    assert failed.error and check.problems(failed, broken)[0].startswith("compile error")


def test_launch_table_choices():
    """What the table promises: 32-row 16-bit attention tiles, 64-row warpgroup tiles on request from sm_90 on,
    the interpreter's 64 x 64."""
    assert attention_launch(torch.bfloat16, 64, 90).query == Tiles(32, 32, 4)
    assert attention_launch(torch.bfloat16, 64, 90, warpgroup=True).query == Tiles(64, 64, 4)
    assert attention_launch(torch.float16, 64, 89, warpgroup=True).query.rows == 32
    assert attention_launch(torch.float32, 64, None) == AttentionLaunch(Tiles(64, 64), Tiles(64, 64))
    for target in check.TARGETS:
        for dtype in check.DTYPES.values():
            launch = attention_launch(dtype, 80, target)
            assert launch.query.rows % launch.query.cols == 0  # the query kernel's loop needs it
