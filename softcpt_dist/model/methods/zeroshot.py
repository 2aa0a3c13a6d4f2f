"""Zero-shot CLIP with each task's hand-written template (CoOp's per-dataset templates)."""

from __future__ import annotations

from typing import Optional

import torch

from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.prompts import TextPromptBank


class ZeroShotCLIP(Method):
    name = "zeroshot"
    trains_prompts = False  # evaluated as built

    @classmethod
    def transfers(cls, cfg: MethodConfig, to: str) -> bool:
        return True  # nothing trained

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, prompt, method)
        texts = [t.template.format(c) for t in group.tasks for c in t.classnames]
        self.prompts = TextPromptBank(texts, backbone)

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.backbone.text_encoder(self.prompts(class_index))

    def prompt_structures(self, class_index: torch.Tensor):
        source, length, _ = self.prompts.structure(0, None, class_index)
        return [(source, length)]
