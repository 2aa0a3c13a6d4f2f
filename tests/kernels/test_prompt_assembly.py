"""The prompt-assembly kernel against the PyTorch path (``PromptBatch.rows`` + positional embedding).

The forward is a gather and one add, so it is bitwise equal to the reference in fp32. Gradients are
sums over the rows that use a context row (or token, or position): bound max|kernel - torch| /
max|torch| <= 1e-6, and two runs are bitwise equal (a segmented reduction, not atomics).
"""

import pytest
import torch

from softcpt_dist.kernels.prompt_assembly import segment_sum
from softcpt_dist.model.prompt_layout import build_layout, prompt_assembly  # the dispatcher

from kernel_cases import prompt_sources, rel_err, requires_gpu

PREFIXES = (0, 1, 17)
SUFFIXES = ((1, 5, 60), (1, 2, 3, 30), (1, 4, 7, 60, 13, 2))
WIDTH, VOCAB, CONTEXT = 80, 50, 77


def _inputs(device="cpu", dtype=torch.float32, packed=True):
    """Token table, context rows, positional embedding and the (source, depth) of every row: the packed
    nodes of a shared-prefix layout, or every (prompt, position) of the padded prompts."""
    source, length, n_ctx = prompt_sources(PREFIXES, SUFFIXES)
    if packed:
        layout = build_layout(source, length)
        rows, depth = layout.node_source, layout.node_depth
    else:  # the dense path's rows: a context row is used by every class prompt of its task
        valid = torch.arange(source.shape[1]) < length[:, None]
        rows, depth = source[valid], torch.nonzero(valid)[:, 1]
    torch.manual_seed(0)
    tokens = torch.randn(VOCAB, WIDTH, dtype=dtype, device=device)
    ctx = torch.randn(n_ctx, WIDTH, device=device)  # learnable contexts stay fp32
    pos = torch.randn(CONTEXT, WIDTH, dtype=dtype, device=device)
    return tokens, ctx, pos, rows.to(device), depth.to(device)


def _run(enabled, tokens, ctx, pos, rows, depth, grad_out, dtype=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (tokens, ctx, pos)]
    out = prompt_assembly(*leaves, rows, depth, dtype, enabled)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("packed", [True, False], ids=["shared-prefix rows", "dense rows"])
def test_matches_torch(interpreter, packed):
    tokens, ctx, pos, rows, depth = _inputs(packed=packed)
    grad_out = torch.randn(len(rows), WIDTH)
    out, grads = _run("auto", tokens, ctx, pos, rows, depth, grad_out)
    ref, ref_grads = _run("off", tokens, ctx, pos, rows, depth, grad_out)
    assert torch.equal(out, ref)
    for name, g, r in zip(("tokens", "context", "positional"), grads, ref_grads):
        assert rel_err(g, r) <= 1e-6, name


def test_context_gradients_are_deterministic(interpreter):
    inputs = _inputs(packed=False)
    grad_out = torch.randn(len(inputs[3]), WIDTH)
    first = _run("auto", *inputs, grad_out)[1]
    second = _run("auto", *inputs, grad_out)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_without_context_rows(interpreter):
    tokens, _, pos, _, _ = _inputs()
    rows, depth = torch.tensor([3, 4, 5, 3]), torch.tensor([0, 1, 2, 0])
    empty = tokens.new_zeros(0, WIDTH)
    assert torch.equal(prompt_assembly(tokens, empty, pos, rows, depth, enabled="auto"),
                       prompt_assembly(tokens, empty, pos, rows, depth, enabled="off"))


def test_segment_sum_ignores_negative_groups_and_fills_empty_groups(interpreter):
    values = torch.arange(12.0).reshape(6, 2)
    out = segment_sum(values, torch.tensor([2, -1, 0, 2, -1, 0]), 4, torch.float32)
    assert out.tolist() == [[14.0, 16.0], [0.0, 0.0], [6.0, 8.0], [0.0, 0.0]]


def test_mismatched_widths_are_named():
    tokens, ctx, pos, rows, depth = _inputs()
    with pytest.raises(ValueError, match="widths differ"):
        prompt_assembly(tokens, ctx[:, :10], pos, rows, depth)


@requires_gpu
def test_bf16_on_gpu(gpu):
    """bf16 encoder: the context is cast to bf16 first and the add rounds once, as in the reference, so the
    forward is bitwise equal; gradients (fp32 sums of bf16 values) within 1e-6 relative."""
    tokens, ctx, pos, rows, depth = _inputs(gpu, torch.bfloat16, packed=False)
    grad_out = torch.randn(len(rows), WIDTH, device=gpu).bfloat16()
    out, grads = _run("auto", tokens, ctx, pos, rows, depth, grad_out)
    ref, ref_grads = _run("off", tokens, ctx, pos, rows, depth, grad_out)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert rel_err(grads[1], ref_grads[1]) <= 1e-6
