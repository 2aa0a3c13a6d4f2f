"""The shared-prefix attention kernel against the bucketed PyTorch path, fp32 under the interpreter.

Bound: max|kernel - torch| / max|torch| <= 1e-5 for the output and the qkv gradient (measured
about 1e-6: the two paths sum the same terms in different orders).
"""

import pytest
import torch

from softcpt_dist.kernels.shared_prefix_attention import tile_plan
from softcpt_dist.model.tree_attention import shared_prefix_attention  # the dispatcher
from softcpt_dist.model.prompt_layout import PromptBatch, build_layout

from kernel_cases import prompt_sources, rel_err, requires_gpu

FP32_BOUND = 1e-5
# Prefixes of 0, 1 and 17 positions; class-name suffixes of 1 to 60 tokens.
PREFIXES = (0, 1, 17)
SUFFIXES = ((1, 5, 60), (1, 2, 3, 30), (1, 4, 7, 60, 13, 2))
# (heads, head dim): the text towers of open_clip ViT-B (8), L (12), H (16) and bigG (20) at 64, and 80, 128.
HEADS = [(8, 64), (12, 64), (16, 64), (20, 64), (3, 80), (2, 128)]


def _layout(device="cpu"):
    source, length, _ = prompt_sources(PREFIXES, SUFFIXES)
    return build_layout(source, length).to(device)


def _run(qkv, layout, heads, enabled, grad_out):
    qkv = qkv.detach().clone().requires_grad_(True)
    out = shared_prefix_attention(qkv, layout, heads, enabled)
    out.backward(grad_out)
    return out.detach(), qkv.grad


@pytest.mark.slow
@pytest.mark.parametrize("heads, head_dim", HEADS)
def test_matches_torch_forward_and_backward(interpreter, heads, head_dim):
    layout = _layout()
    torch.manual_seed(heads * head_dim)
    qkv = torch.randn(layout.positions, 3 * heads * head_dim)
    grad_out = torch.randn(layout.positions, heads * head_dim)
    out, grad = _run(qkv, layout, heads, "auto", grad_out)
    ref_out, ref_grad = _run(qkv, layout, heads, "off", grad_out)
    assert rel_err(out, ref_out) <= FP32_BOUND
    assert rel_err(grad, ref_grad) <= FP32_BOUND


def test_backward_is_deterministic(interpreter):
    layout = _layout()
    qkv, grad_out = torch.randn(layout.positions, 3 * 128), torch.randn(layout.positions, 128)
    first, second = _run(qkv, layout, 2, "auto", grad_out), _run(qkv, layout, 2, "auto", grad_out)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_tiles_need_only_the_first_nodes_ancestors():
    """The property the kernel rests on: a query tile's keys outside it are its first node's ancestors."""
    layout = _layout()
    plan = tile_plan(layout.node_parent, 32)
    parent, end = layout.node_parent.tolist(), layout.subtree_end.tolist()
    for t in range(plan.tiles):
        first = 32 * t
        listed = set(plan.ancestors[plan.start[t]:plan.start[t + 1]].tolist())
        for q in range(first, min(first + 32, layout.positions)):
            k = parent[q]
            while k >= 0:
                assert k >= first or k in listed
                assert k <= q < end[k]
                k = parent[k]


def test_text_encoder_with_kernels_matches_torch(interpreter, tiny_backbone):
    """Through the whole shared-prefix text path (prompt assembly, every block's attention): class
    features and the context gradient."""
    encoder = tiny_backbone.text_encoder
    source, length, n_ctx = prompt_sources((0, 1, 17), ((1, 3, 50), (2, 2, 9), (1, 5, 20, 40)))
    vocab, width = 50, encoder.width
    torch.manual_seed(1)
    tokens = torch.randn(vocab, width)
    ctx = torch.randn(n_ctx, width)
    results = []
    for enabled in ("auto", "off"):
        leaf = ctx.clone().requires_grad_(True)
        encoder.set_kernels(enabled)
        try:
            features = encoder(PromptBatch(tokens, leaf, source, length, length - 1))
        finally:
            encoder.set_kernels("auto")
        features.square().sum().backward()
        results.append((features.detach(), leaf.grad))
    (feat, grad), (ref_feat, ref_grad) = results
    assert rel_err(feat, ref_feat) <= FP32_BOUND
    assert rel_err(grad, ref_grad) <= FP32_BOUND


BF16_BOUND = 3e-2  # bf16 inputs (8 mantissa bits) against the fp32 torch path on the same rounded inputs


@requires_gpu
@pytest.mark.parametrize("heads, head_dim", HEADS)
def test_bf16_on_gpu(gpu, heads, head_dim):
    layout = _layout(gpu)
    torch.manual_seed(0)
    qkv = torch.randn(layout.positions, 3 * heads * head_dim, device=gpu).bfloat16()
    grad_out = torch.randn(layout.positions, heads * head_dim, device=gpu).bfloat16()
    out, grad = _run(qkv, layout, heads, "auto", grad_out)
    ref_out, ref_grad = _run(qkv.float(), layout, heads, "off", grad_out.float())
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    assert rel_err(out, ref_out) <= BF16_BOUND
    assert rel_err(grad, ref_grad) <= BF16_BOUND
