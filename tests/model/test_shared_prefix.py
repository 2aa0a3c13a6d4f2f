"""The shared-prefix text path equals the dense reference path, features and gradients, everywhere.

"Equal" here: max |shared - dense| / max |dense| <= 1e-5 in fp32 (both paths sum the same products
in different orders), for the class features and the gradient of every learnable tensor.
"""

import logging

import open_clip
import pytest
import torch

from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model.backbone import ensure_builtin_configs
from softcpt_dist.model.prompt_layout import build_layout
from softcpt_dist.model.text_encoder import TextEncoder

FP32 = 1e-5
WORDS = ("stripe", "red", "mildew", "tomato", "dog", "river", "coupe", "leaf")
METHODS = ([("softcpt", {"variant": v}) for v in ("NATA", "NATS", "CATA", "CSTA", "CATS", "CSTS")]
           + [("coop", {"coop_mode": m}) for m in ("CA", "CS", "MT")] + [("zeroshot", {})])


@pytest.fixture(scope="module")
def group(tiny_backbone):
    """A task with 1 class, one with 397, and class names of 1 to 40 tokens (some the prefix of another)."""
    lengths = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(n)) for i, n in enumerate(range(1, 41))]
    lengths += ["stripe " * 3 + "red", "stripe " * 3 + "dog"]  # names that share their first tokens
    group = TaskGroup([TaskSpec("one", "single class task", ("thing",)),
                       TaskSpec("many", "scene recognition", tuple(f"scene number {i}" for i in range(397))),
                       TaskSpec("long", "texture recognition", tuple(lengths))])
    n_tokens = [len(tiny_backbone.tokenizer.encode(n)) for n in lengths]
    assert min(n_tokens) == 1 and max(n_tokens) >= 40
    return group


def _features_and_grads(method, backbone, path, class_index=None):
    backbone.text_encoder.path = path
    method.zero_grad(set_to_none=True)
    features = method(class_index)
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(0))
    if features.requires_grad:
        (features.float() * weights).sum().backward()
    return features.detach().float(), {n: p.grad.float() for n, p in method.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))


def _assert_paths_agree(method, backbone, tol=FP32, class_index=None):
    try:
        dense, dense_grads = _features_and_grads(method, backbone, "dense", class_index)
        shared, shared_grads = _features_and_grads(method, backbone, "shared_prefix", class_index)
    finally:
        backbone.text_encoder.path = "shared_prefix"
    assert _rel(dense, shared) <= tol
    assert dense_grads.keys() == shared_grads.keys() == {n for n, p in method.named_parameters() if p.requires_grad}
    for name in dense_grads:
        assert _rel(dense_grads[name], shared_grads[name]) <= tol, name


@pytest.mark.slow
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("name,options", METHODS, ids=[f"{n}-{'-'.join(o.values())}" for n, o in METHODS])
def test_shared_prefix_path_equals_dense_path(tiny_backbone, group, name, options, position):
    torch.manual_seed(0)
    method = build_method(tiny_backbone, group, MethodConfig(name=name, **options),
                          PromptConfig(class_token_position=position))
    _assert_paths_agree(method, tiny_backbone)


@pytest.mark.parametrize("name,options", [("softcpt", {"variant": "NATA"}), ("softcpt", {"variant": "CSTS"}),
                                          ("coop", {"coop_mode": "CA"}), ("zeroshot", {})])
def test_task_grouped_class_subsets_agree(tiny_backbone, group, name, options):
    torch.manual_seed(0)
    method = build_method(tiny_backbone, group, MethodConfig(name=name, **options))
    subset = torch.cat([torch.arange(group.offsets[t], group.offsets[t] + group.tasks[t].num_classes) for t in (0, 2)])
    _assert_paths_agree(method, tiny_backbone, class_index=subset)


def test_activation_checkpointing_on_the_shared_path(tiny_backbone, group):
    torch.manual_seed(0)
    method = build_method(tiny_backbone, group, MethodConfig(variant="CATA"))
    reference = _features_and_grads(method, tiny_backbone, "dense")
    tiny_backbone.set_grad_checkpointing(True)
    try:
        checkpointed = _features_and_grads(method, tiny_backbone, "shared_prefix")
    finally:
        tiny_backbone.set_grad_checkpointing(False)
        tiny_backbone.text_encoder.path = "shared_prefix"
    assert _rel(reference[0], checkpointed[0]) <= FP32
    for name in reference[1]:
        assert _rel(reference[1][name], checkpointed[1][name]) <= FP32


@pytest.mark.slow
@pytest.mark.parametrize("precision,tol", [("bf16", 2e-2), ("fp16", 4e-3)])
def test_half_precision_paths_agree(group, precision, tol):
    from softcpt_dist.config import ModelConfig
    from softcpt_dist.model import build_backbone
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(arch="softcpt-tiny", precision=precision))
    torch.manual_seed(0)
    _assert_paths_agree(build_method(backbone, group, MethodConfig(variant="NATS")), backbone, tol)


def test_shared_prefixes_are_encoded_once(tiny_backbone, group):
    """SoftCPT NA: all class prompts of a task start with the same [SOS] ctx_1..ctx_N."""
    torch.manual_seed(0)
    method = build_method(tiny_backbone, group, MethodConfig(variant="NATA"))
    ctx, owner = method.context_groups()
    batch = method.class_prompts(ctx.detach(), owner)
    layout = tiny_backbone.text_encoder.layout(batch)
    own_tokens = int((batch.length - 1 - 16).sum())  # each prompt's tokens after [SOS] ctx_1..ctx_16
    assert layout.positions <= 1 + len(group) * 16 + own_tokens < int(batch.length.sum())


def test_layout_of_a_small_prompt_tree():
    # Prompts a b c | a b d | a e: nodes a, b, e, c, d; segments [a], [b], [e], [c], [d].
    source = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 4, 9]])
    layout = build_layout(source, torch.tensor([3, 3, 2]), key_block=1, min_queries=1)  # the bare tree
    assert layout.positions == 5
    assert sorted((b.start, b.queries.shape[1], b.queries.shape[0]) for b in layout.buckets) == [(0, 1, 1), (1, 1, 2),
                                                                                                 (2, 1, 2)]
    assert layout.node_source[layout.eot_nodes].tolist() == [2, 3, 4]
    padded = build_layout(source, torch.tensor([3, 3, 2]))  # batch-invariant: >= 4 queries, 16 keys a call
    assert padded.positions == 5 and all(b.queries.shape[1] == 4 and b.keys.shape[1] == 16 for b in padded.buckets)


def test_a_text_tower_without_causal_mask_falls_back_to_dense(caplog):
    ensure_builtin_configs()
    model = open_clip.create_model("softcpt-tiny", pretrained=None)
    model.attn_mask = None
    with caplog.at_level(logging.INFO, logger="softcpt_dist"):
        encoder = TextEncoder(model, "shared_prefix")
    assert encoder.path == "dense" and "text.path=dense" in caplog.text
