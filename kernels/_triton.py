"""When a kernel runs as Triton and how it is compiled: the one decision every dispatcher shares.

Triton kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter, fp32 only: what CI tests them with). ``triton.jit`` fixes the mode when it decorates a
function. Triton's own library functions (``tl.max``, ``tl.cdiv``, ...) are decorated when Triton is
imported, which ``import torch`` does: the interpreter works only if the variable was set before
that. Kernels here are jitted lazily, per mode, at their first launch, so a process whose Triton was
imported under the interpreter (the test suite on CPU machines) can turn it on and off per call.
"""

from __future__ import annotations

import os
from typing import Callable, Dict

import torch

try:  # Triton ships with Linux builds of torch; elsewhere every dispatcher takes the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton, tl = None, None

ENABLED = ("auto", "off")  # kernels.enabled


def interpreting() -> bool:
    """``TRITON_INTERPRET=1`` now, and Triton was imported under it (else its library cannot interpret)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and interpreter_ready()


def interpreter_ready() -> bool:
    """Whether Triton's own library was jitted for the interpreter (Triton imported under TRITON_INTERPRET=1)."""
    return triton is not None and type(tl.max).__name__ == "InterpretedFunction"


def use_triton(enabled: str, *tensors: torch.Tensor) -> bool:
    """Whether ``enabled`` (``kernels.enabled``) and these tensors send a call to the Triton kernels: all on
    one CUDA device (not interpreting), or all fp32 on the CPU under the interpreter."""
    if enabled not in ENABLED:
        raise ValueError(f"kernels.enabled={enabled!r} is not one of {list(ENABLED)}")
    if enabled == "off" or triton is None or not tensors:
        return False
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return False
    device = devices.pop()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        exact = (torch.float32, torch.int32, torch.int64)
        return interpreter_ready() and device.type == "cpu" and all(t.dtype in exact for t in tensors)
    return device.type == "cuda"


def describe(enabled: str, device) -> str:
    """Which path the kernels take for fp32 tensors on ``device``, in words (logged at the start of a run)."""
    device = torch.device(device)
    if use_triton(enabled, torch.empty(0, device=device)):
        return "Triton (interpreter)" if device.type == "cpu" else "Triton"
    if enabled == "off":
        return "torch (kernels.enabled=off)"
    if triton is None:
        return "torch (Triton is not installed)"
    return "torch (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"


class LazyKernel:
    """A Triton kernel written as a plain function, jitted at its first launch in the current mode."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._jitted: Dict[bool, object] = {}

    def __getitem__(self, grid):
        mode = interpreting()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode][grid]


def kernel(fn: Callable) -> LazyKernel:
    """Decorator: ``@kernel`` in place of ``@triton.jit``."""
    return LazyKernel(fn)


def block(n: int, least: int = 16, most: int = 128) -> int:
    """A power-of-two block size covering ``n`` (within ``least``..``most``)."""
    return max(least, min(most, 1 << max(int(n) - 1, 0).bit_length()))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products in full precision (the reference's); tensor-core formats as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"
