"""Prompt assembly: the packed text-encoder input written in one pass.

Row ``i`` of the packed input is the frozen token embedding of its node's token, or the context row
of its prompt group (learnable), plus the positional embedding of its depth: one gather-add kernel
in place of two gathers, a select and an add. Backward sums each context row's gradient over the
nodes that use it with a segmented reduction (rows sorted by context row, each sum taken in a fixed
order by one program), not float atomics, so context gradients are bitwise reproducible. Token and
positional embeddings get gradients the same way when they require them (frozen CLIP: never).

The kernel takes plain tensors; the model's dispatcher (``softcpt_dist.model.prompt_layout.prompt_assembly``)
decides when to call it, and its PyTorch path (``PromptBatch.rows`` plus the positional embedding) is
the reference.
"""

from __future__ import annotations

import torch

from softcpt_dist.kernels._triton import block, kernel, tl

BLOCK_ROWS = 16
BLOCK_GROUPS = 16


@kernel
def _assemble(TOKENS, CTX, POS, SOURCE, DEPTH, OUT, n_rows, width, stride_tok, stride_ctx, stride_pos, stride_out,
              HAS_CTX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < width)[None, :]
    source = tl.load(SOURCE + rows, mask=row_ok, other=0)
    depth = tl.load(DEPTH + rows, mask=row_ok, other=0)
    dtype = OUT.dtype.element_ty
    is_ctx = source < 0
    emb = tl.load(TOKENS + tl.maximum(source, 0)[:, None] * stride_tok + cols[None, :],
                  mask=mask & ~is_ctx[:, None], other=0.0).to(dtype)
    if HAS_CTX:  # context rows are cast to the encoder's dtype first, as the reference does
        ctx = tl.load(CTX + tl.maximum(-1 - source, 0)[:, None] * stride_ctx + cols[None, :],
                      mask=mask & is_ctx[:, None], other=0.0).to(dtype)
        emb = tl.where(is_ctx[:, None], ctx, emb)
    pos = tl.load(POS + depth[:, None] * stride_pos + cols[None, :], mask=mask, other=0.0).to(dtype)
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], (emb.to(tl.float32) + pos.to(tl.float32)).to(dtype),
             mask=mask)


@kernel
def _segment_sum(VALUES, ORDER, START, OUT, n_groups, width, longest, stride_val, stride_out,
                 BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr):
    """``OUT[g] = sum of VALUES[ORDER[START[g]:START[g + 1]]]`` in that order, accumulated in fp32, for a
    block of groups (``longest``: the largest group)."""
    groups = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    group_ok = groups < n_groups
    cols = tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < width
    lo = tl.load(START + groups, mask=group_ok, other=0)
    hi = tl.load(START + groups + 1, mask=group_ok, other=0)
    acc = tl.zeros([BLOCK_G, BLOCK_W], tl.float32)
    for i in range(0, longest):
        member = group_ok & (lo + i < hi)
        row = tl.load(ORDER + lo + i, mask=member, other=0)
        acc += tl.load(VALUES + row[:, None] * stride_val + cols[None, :], mask=member[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(OUT + groups[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=group_ok[:, None] & col_ok[None, :])


def segment_sum(values: torch.Tensor, group: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``out[g] = sum of values[i] over i with group[i] == g`` (``[groups, W]``, zeros where none;
    rows with ``group < 0`` are ignored): deterministic, each group summed by one program."""
    keep = torch.nonzero(group >= 0).flatten()
    order = keep[torch.sort(group[keep], stable=True).indices]
    counts = torch.bincount(group[keep], minlength=groups)
    start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    out = torch.empty(groups, values.shape[1], dtype=dtype, device=values.device)
    width = values.shape[1]
    bw = block(width, most=256)
    if groups:
        longest = int(counts.max())  # one host sync per backward: the loop bound
        _segment_sum[(-(-groups // BLOCK_GROUPS), -(-width // bw))](
            values, order, start, out, groups, width, longest, values.stride(0), out.stride(0),
            BLOCK_G=BLOCK_GROUPS, BLOCK_W=bw)
    return out


class _PromptAssembly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, context, positional, source, depth, dtype):
        rows, width = source.shape[0], tokens.shape[1]
        out = torch.empty(rows, width, dtype=dtype, device=tokens.device)
        has_ctx = context.shape[0] > 0
        bw = block(width, most=256)
        tokens, positional = tokens.contiguous(), positional.contiguous()
        context = context.contiguous() if has_ctx else tokens
        _assemble[(-(-rows // BLOCK_ROWS), -(-width // bw))](
            tokens, context, positional, source, depth, out, rows, width, tokens.stride(0), context.stride(0),
            positional.stride(0), out.stride(0), HAS_CTX=has_ctx, BLOCK_R=BLOCK_ROWS, BLOCK_W=bw)
        ctx.save_for_backward(source, depth)
        ctx.shapes = (tokens.shape[0], context.shape[0] if has_ctx else 0, positional.shape[0])
        ctx.dtypes = (tokens.dtype, context.dtype, positional.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        source, depth = ctx.saved_tensors
        grad = grad.contiguous()
        n_tok, n_ctx, n_pos = ctx.shapes
        grads = [None, None, None]
        need = ctx.needs_input_grad
        if need[0]:
            grads[0] = segment_sum(grad, torch.where(source >= 0, source, -1), n_tok, ctx.dtypes[0])
        if need[1]:
            grads[1] = segment_sum(grad, torch.where(source < 0, -1 - source, -1), n_ctx, ctx.dtypes[1])
        if need[2]:
            grads[2] = segment_sum(grad, depth, n_pos, ctx.dtypes[2])
        return (*grads, None, None, None)


def triton_prompt_assembly(tokens: torch.Tensor, context: torch.Tensor, positional: torch.Tensor,
                           source: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Packed encoder input ``[R, D]`` in the tokens' dtype: row ``i`` is ``tokens[source[i]]`` (``source >= 0``)
    or ``context[-1 - source[i]]`` (``< 0``), plus ``positional[depth[i]]``; every width equal (``context``
    may have no rows: the dispatcher passes ``[0, D]`` in the tokens' dtype then)."""
    return _PromptAssembly.apply(tokens, context, positional, source, depth, tokens.dtype)
