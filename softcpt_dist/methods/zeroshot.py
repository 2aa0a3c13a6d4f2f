"""Zero-shot CLIP with each task's hand-written template (CoOp's per-dataset templates)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.prompts import TextPromptBank


class ZeroShotCLIP(nn.Module):
    official_module_count = 1

    def __init__(self, backbone, group: TaskGroup):
        super().__init__()
        self.__dict__["backbone"] = backbone
        texts = [t.template.format(c) for t in group.tasks for c in t.classnames]
        self.prompts = TextPromptBank(texts, backbone)

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb, eot = self.prompts()
        if class_index is not None:
            emb, eot = emb[class_index], eot[class_index]
            if self.backbone.text_encoder.causal:
                emb = emb[:, : int(eot.max()) + 1]
        return self.backbone.text_encoder(emb, eot)
