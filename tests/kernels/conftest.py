"""Kernel tests: fp32 under Triton's interpreter on the CPU (every machine, CI included); bf16 on a GPU."""

import pytest
import torch

from softcpt_dist.kernels import _triton


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter on CPU tensors (kernels jit lazily, so setting it now takes effect; Triton's own
    library was imported under it by tests/conftest.py on machines without a GPU)."""
    if not _triton.interpreter_ready():
        pytest.skip("Triton was not imported under TRITON_INTERPRET=1 (a GPU machine: the bf16 tests run there)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.fixture
def gpu(monkeypatch):
    if not torch.cuda.is_available() or _triton.triton is None:
        pytest.skip("bf16 kernels need a CUDA GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return "cuda"
