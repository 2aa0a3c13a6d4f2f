"""Shared pieces of the kernel tests: prompt structures, the error measure, GPU markers."""

from typing import Sequence, Tuple

import pytest
import torch

from softcpt_dist.kernels import _triton

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available() or _triton.triton is None,
                                  reason="bf16 kernels need a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the bound every fp32 check here states)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def prompt_sources(prefixes: Sequence[int], suffix_lengths: Sequence[Sequence[int]], n_tokens: int = 50,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(source, length, n_ctx_rows)``: task ``t`` has a shared prefix of ``prefixes[t]`` positions
    (its own context rows, as a SoftCPT task's ``[SOS] ctx_1..N``; position 0 is a token when the prefix
    is 0, so prompts differ from the start) and one class prompt per entry of ``suffix_lengths[t]``
    (random tokens: suffixes of one task may still share leading tokens, as real class names do)."""
    g = torch.Generator().manual_seed(seed)
    prompts, ctx_rows = [], 0
    for prefix, lengths in zip(prefixes, suffix_lengths):
        shared = [-1 - (ctx_rows + i) for i in range(prefix)]
        ctx_rows += prefix
        for n in lengths:
            prompts.append(shared + torch.randint(0, n_tokens, (n,), generator=g).tolist())
    longest = max(len(p) for p in prompts)
    source = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        source[i, : len(p)] = torch.tensor(p)
    length = torch.tensor([len(p) for p in prompts])
    return source, length, ctx_rows
