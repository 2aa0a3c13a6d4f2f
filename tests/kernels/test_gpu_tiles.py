"""Every tiling a GPU launch uses (``kernels/launch.py``, per target, dtype and head dim), executed in fp32
under the interpreter against the torch reference, within the bounds of the other kernel tests (1e-5).

The interpreter's own tiles are covered by the other kernel tests; here the tile shapes that sm_80 ... sm_100
get for fp32, bf16 and fp16, the attention's warpgroup tiles included (warps and stages do not change the
arithmetic) run on the odd shapes those
tests use: prefixes of 0, 1 and 17 positions, suffixes of 1 to 60 tokens, tasks of 1 and 397 classes, an
embedding dimension that is no multiple of the chunk. On a GPU (``benchmarks/gpu_check.sh``) the
dispatchers' own launches run in fp32, fp16 and bf16 against the fp32 torch path.
"""

import pytest
import torch

from softcpt_dist.kernels.compile_check import DTYPES, TARGETS
from softcpt_dist.kernels.cosine_ce import fused_cosine_cross_entropy, fused_within_task_predict
from softcpt_dist.kernels.launch import AttentionLaunch, LossLaunch, Tiles, attention_launch, loss_launch
from softcpt_dist.kernels.shared_prefix_attention import triton_shared_prefix_attention
from softcpt_dist.model.loss import cosine_cross_entropy
from softcpt_dist.model.tree_attention import shared_prefix_attention

from kernel_cases import rel_err, requires_gpu

pytestmark = pytest.mark.slow  # about a minute of interpreter work
from test_cosine_ce import SIZES, _batch
from test_shared_prefix_attention import BF16_BOUND, FP32_BOUND, _layout


def _distinct(make, options=(False,)):
    """``{tiles: [targets and dtypes that launch them]}`` (tiles as the kernels see them: no warps/stages)."""
    found = {}
    for target in TARGETS:
        for name, dtype in DTYPES.items():
            for option in options:
                found.setdefault(make(dtype, target, option), []).append(f"sm_{target} {name}")
    return found


def _attention_tiles(head_dim):
    def shape(dtype, target, warpgroup):
        launch = attention_launch(dtype, head_dim, target, warpgroup)
        return (launch.query.rows, launch.query.cols), (launch.key.rows, launch.key.cols)
    return _distinct(shape, (False, True))


ATTENTION_CASES = [(heads, head_dim, tiles) for heads, head_dim in ((12, 64), (3, 80), (2, 128))
                   for tiles in _attention_tiles(head_dim)]


@pytest.mark.parametrize("heads, head_dim, tiles", ATTENTION_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_attention_gpu_tiles_match_torch(interpreter, heads, head_dim, tiles):
    (qm, qn), (km, kn) = tiles
    launch = AttentionLaunch(Tiles(qm, qn), Tiles(km, kn))
    layout = _layout()
    torch.manual_seed(heads * head_dim)
    qkv = torch.randn(layout.positions, 3 * heads * head_dim)
    grad_out = torch.randn(layout.positions, heads * head_dim)
    results = []
    for kernel in (True, False):
        leaf = qkv.clone().requires_grad_(True)
        if kernel:
            out = triton_shared_prefix_attention(leaf, layout.node_parent, layout.subtree_end, heads, launch=launch)
        else:
            out = shared_prefix_attention(leaf, layout, heads, "off")
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (out, grad), (ref_out, ref_grad) = results
    assert rel_err(out, ref_out) <= FP32_BOUND
    assert rel_err(grad, ref_grad) <= FP32_BOUND


def _loss_tiles(dim):
    return _distinct(lambda dtype, target, _: (lambda l: (l.samples, l.classes, l.chunk))(loss_launch(dtype, dim, target)))


LOSS_CASES = [(dim, tiles) for dim in (512, 768) for tiles in _loss_tiles(dim)]


@pytest.mark.parametrize("dim, tiles", LOSS_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_gpu_tiles_match_torch(interpreter, dim, tiles, weighted):
    """The tiles a ``dim``-wide embedding gets on a GPU, run at dimension 70 (no multiple of the chunk)
    on 70 samples of tasks of 1 to 397 classes: loss, predictions, every gradient."""
    samples, classes, chunk = tiles
    launch = LossLaunch(samples, classes, chunk)
    img, txt, scale, tasks, targets, class_task = _batch(n=70, dim=70)
    weights = torch.rand(len(SIZES)) if weighted else None
    results = []
    for kernel in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (img, txt, scale)]
        if kernel:
            loss, pred = fused_cosine_cross_entropy(*leaves, tasks, targets, class_task, weights, launch=launch)
        else:
            loss, pred = cosine_cross_entropy(*leaves, tasks, targets, class_task, weights, "off")
        loss.backward()
        results.append((loss.detach(), pred, [t.grad for t in leaves]))
    (loss, pred, grads), (ref_loss, ref_pred, ref_grads) = results
    assert rel_err(loss, ref_loss) <= FP32_BOUND
    assert torch.equal(pred, ref_pred)
    for name, g, r in zip(("image", "class", "logit_scale"), grads, ref_grads):
        assert rel_err(g, r) <= FP32_BOUND, name
    assert torch.equal(fused_within_task_predict(img, txt, scale, tasks, class_task, launch=launch), ref_pred)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads, head_dim", [(12, 64), (3, 80), (2, 128)])
def test_attention_on_this_gpu(gpu, dtype, heads, head_dim):
    """The dispatcher's own launch for this GPU, against the fp32 torch path on the same (rounded) inputs:
    fp32 within 1e-5 (exact products on both sides), 16-bit within the bf16 tests' 3e-2."""
    layout = _layout(gpu)
    torch.manual_seed(0)
    qkv = torch.randn(layout.positions, 3 * heads * head_dim, device=gpu).to(dtype)
    grad_out = torch.randn(layout.positions, heads * head_dim, device=gpu).to(dtype)
    results = []
    for enabled, cast in (("auto", dtype), ("off", torch.float32)):
        leaf = qkv.detach().clone().to(cast).requires_grad_(True)
        out = shared_prefix_attention(leaf, layout, heads, enabled)
        out.backward(grad_out.to(cast))
        results.append((out.detach(), leaf.grad))
    (out, grad), (ref_out, ref_grad) = results
    bound = FP32_BOUND if dtype == torch.float32 else BF16_BOUND
    assert out.dtype == dtype and rel_err(out, ref_out) <= bound and rel_err(grad, ref_grad) <= bound


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [70, 768])
def test_loss_on_this_gpu(gpu, dtype, dim):
    """The loss with features in ``dtype`` on this GPU against the fp32 torch path: fp32 within 1e-5 and the
    same predictions; 16-bit within 1e-2, predictions differing on at most 2% (logits within rounding)."""
    img, txt, scale, tasks, targets, class_task = _batch(n=256, dim=dim, device=gpu, dtype=dtype)
    results = []
    for enabled, cast in (("auto", dtype), ("off", torch.float32)):
        leaves = [t.detach().clone().to(c).requires_grad_(True) for t, c in ((img, cast), (txt, cast), (scale, scale.dtype))]
        loss, pred = cosine_cross_entropy(*leaves, tasks, targets, class_task, None, enabled)
        loss.backward()
        results.append((loss.detach(), pred, [t.grad for t in leaves]))
    (loss, pred, grads), (ref_loss, ref_pred, ref_grads) = results
    if dtype == torch.float32:
        assert rel_err(loss, ref_loss) <= FP32_BOUND and torch.equal(pred, ref_pred)
        assert all(rel_err(g, r) <= FP32_BOUND for g, r in zip(grads, ref_grads))
    else:
        assert rel_err(loss, ref_loss) <= 1e-2 and float((pred != ref_pred).float().mean()) <= 0.02
        assert all(g.dtype == dtype and rel_err(g, r) <= 1e-2 for g, r in zip(grads[:2], ref_grads[:2]))
