"""Import-time compatibility shims.

PyPI's torchvision wheels are CUDA builds. Next to the CPU build of torch their compiled
extension cannot load, and ``import torchvision`` then fails while registering fake kernels
for ``torchvision::nms``/``qnms``. We only need torchvision's transforms (open_clip's
preprocessing), so on exactly that failure we define the two operator schemas and import
again. Installs whose torchvision loads normally never reach the shim.
"""

from __future__ import annotations

import sys

import torch

_MISSING_OPS = ("nms", "qnms")
# The Library object must stay alive for its definitions to stay registered.
_stub_library: torch.library.Library | None = None


def import_torchvision():
    """Import torchvision, defining its detection op schemas first if a CPU-only torch lacks them."""
    global _stub_library
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        if "torchvision::nms" not in str(err) and "torchvision::qnms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _stub_library is None:
        _stub_library = torch.library.Library("torchvision", "DEF")
        for op in _MISSING_OPS:
            _stub_library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision

