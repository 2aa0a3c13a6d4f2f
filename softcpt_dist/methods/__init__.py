"""Methods: SoftCPT, CoOp (CA / CS / MT), zero-shot CLIP (prompt methods), and the linear probe.

A prompt method is an ``nn.Module`` whose ``forward(class_index=None)`` returns the raw text
feature of every class of the task group (or of the selected global classes); the shared
training loop and evaluator turn those into cosine logits.
"""

from __future__ import annotations

import torch.nn as nn

from softcpt_dist.config import Config, ConfigError
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.methods.coop import CoOp
from softcpt_dist.methods.softcpt import SoftCPT
from softcpt_dist.methods.zeroshot import ZeroShotCLIP


def build_prompt_method(cfg: Config, backbone, group: TaskGroup) -> nn.Module:
    name = cfg.method.name
    if name == "softcpt":
        method = SoftCPT(backbone, group, cfg.prompt, cfg.method)
    elif name == "coop":
        method = CoOp(backbone, group, cfg.prompt, cfg.method.coop_mode)
    elif name == "zeroshot":
        method = ZeroShotCLIP(backbone, group)
    else:
        method = None
    if method is not None:
        # Learnable tensors live where the frozen CLIP lives (the backbone itself is not a submodule).
        return method.to(backbone.device)
    raise ConfigError(f"method.name={name!r} has no prompt model (linear_probe trains no prompts)")


def method_label(cfg: Config) -> str:
    """Short name used in run names and reports, e.g. softcpt-NATA, coop-CS."""
    if cfg.method.name == "softcpt":
        return f"softcpt-{cfg.method.variant}"
    if cfg.method.name == "coop":
        return f"coop-{cfg.method.coop_mode}"
    return cfg.method.name.replace("_", "-")
