"""Zero-shot CLIP: each task's hand-written template (CoOp's per-dataset templates), or a prompt ensemble.

``method.zeroshot_templates=ensemble`` is the official ``ZeroshotCLIP2``: the seven ImageNet templates CLIP
selected plus the task's own; each template's class features are L2-normalised, then averaged (the cosine
logits normalise the mean again).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.prompts import TextPromptBank

# CLIP's selection of seven ImageNet templates (Radford et al. 2021; the official IMAGENET_TEMPLATES_SELECT).
ENSEMBLE_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                      "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def template_features(backbone, group: TaskGroup) -> torch.Tensor:
    """Frozen CLIP's L2-normalised features ``[C, E]`` of every class in its task's own template (zero-shot
    CLIP's classifier; what KgCoOp stays close to and ProGrad's teacher predicts with)."""
    bank = TextPromptBank([t.template.format(c) for t in group.tasks for c in t.classnames], backbone)
    with torch.no_grad():
        return F.normalize(backbone.text_encoder(bank()).float(), dim=-1)


class ZeroShotCLIP(Method):
    name = "zeroshot"
    trains_prompts = False  # evaluated as built

    @classmethod
    def transfers(cls, cfg: MethodConfig, to: str) -> bool:
        return True  # nothing trained

    @classmethod
    def label(cls, cfg: MethodConfig) -> str:
        return "zeroshot" + ("-ensemble" if cfg.zeroshot_templates == "ensemble" else "")

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, prompt, method)
        per_task = [[t.template] for t in group.tasks]
        if method.zeroshot_templates == "ensemble":
            per_task = [list(ENSEMBLE_TEMPLATES) + own for own in per_task]
        width = len(per_task[0])  # templates per class, the same for every task
        self.banks = nn.ModuleList(
            TextPromptBank([tmpl[i].format(c) for t, tmpl in zip(group.tasks, per_task) for c in t.classnames],
                           backbone) for i in range(width))

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(self.banks) == 1:
            return self.backbone.text_encoder(self.banks[0](class_index))
        features = [F.normalize(self.backbone.text_encoder(bank(class_index)).float(), dim=-1) for bank in self.banks]
        return torch.stack(features).mean(dim=0)

    def prompt_structures(self, class_index: torch.Tensor):
        return [bank.structure(0, None, class_index)[:2] for bank in self.banks]
