"""Methods: SoftCPT, CoOp (CA / CS / MT), CoCoOp, KgCoOp, ProGrad, PLOT, zero-shot CLIP, the linear probe and ProtoNet, behind one
interface.

``METHODS`` is the registry (``method.name`` -> class); adding a method is one new file with a
``Method`` subclass plus its line here.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig
from softcpt_dist.config.sections import OFFICIAL_PRECISION_METHODS
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.methods.cocoop import CoCoOp
from softcpt_dist.model.methods.coop import CoOp
from softcpt_dist.model.methods.kgcoop import KgCoOp
from softcpt_dist.model.methods.linear_probe import LinearProbe
from softcpt_dist.model.methods.plot import PLOT
from softcpt_dist.model.methods.prograd import ProGrad
from softcpt_dist.model.methods.protonet import ProtoNet
from softcpt_dist.model.methods.softcpt import SoftCPT
from softcpt_dist.model.methods.zeroshot import ZeroShotCLIP

METHODS: Dict[str, Type[Method]] = {m.name: m for m in (SoftCPT, CoOp, CoCoOp, KgCoOp, ProGrad, PLOT, ZeroShotCLIP, LinearProbe, ProtoNet)}


def method_class(cfg: MethodConfig, prompt: Optional[PromptConfig] = None) -> Type[Method]:
    """The class registered as ``method.name``; with ``prompt``, its settings are checked too."""
    if cfg.name not in METHODS:
        raise ConfigError(f"method.name={cfg.name!r} is not one of {list(METHODS)}")
    if prompt is not None:
        METHODS[cfg.name].check(cfg, prompt)
    return METHODS[cfg.name]


def method_label(cfg: MethodConfig) -> str:
    """Short name used in run names and reports, e.g. softcpt-NATA, coop-CS."""
    return method_class(cfg).label(cfg)


def build_method(backbone, group: TaskGroup, method: Optional[MethodConfig] = None,
                 prompt: Optional[PromptConfig] = None) -> Method:
    """The prompt model of ``method`` (default: SoftCPT NATA) for ``group`` on ``backbone``'s device
    (the backbone is shared, not a submodule)."""
    method, prompt = method or MethodConfig(), prompt or PromptConfig()
    cls = method_class(method, prompt)
    if cls.fits:
        raise ConfigError(f"method.name={method.name!r} has no prompt model ({method.name} trains no prompts)")
    if getattr(backbone, "official_fp16", False) and cls.name not in OFFICIAL_PRECISION_METHODS:
        raise ConfigError(f"model.precision=official_fp16 (the official SoftCPT code's PREC=fp16) is defined for "
                          f"method.name={' and '.join(OFFICIAL_PRECISION_METHODS)}, not {method.name}")
    return cls(backbone, group, prompt, method).to(backbone.device)



__all__ = ["METHODS", "CoCoOp", "CoOp", "KgCoOp", "LinearProbe", "Method", "PLOT", "ProGrad", "ProtoNet", "SoftCPT", "ZeroShotCLIP", "build_method", "method_class",
           "method_label"]
