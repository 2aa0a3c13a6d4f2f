"""CoOp baselines on the multi-task harness.

CA: one learnable context per task (trained per task, as CoOp is); CS: one per class;
MT: a single context shared by every class of every task, trained jointly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from softcpt_dist.config import PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.meta_net import context_vectors
from softcpt_dist.prompts import ContextPromptBank


class CoOp(nn.Module):
    official_module_count = 1

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, mode: str = "CA"):
        super().__init__()
        self.mode = mode
        self.__dict__["backbone"] = backbone
        n_groups = {"CA": len(group), "CS": group.num_classes, "MT": 1}[mode]
        self.ctx = context_vectors(n_groups, prompt.n_ctx, backbone.ctx_dim, prompt.init_std)
        self.class_prompts = ContextPromptBank(group.classnames, prompt.n_ctx, backbone,
                                               prompt.class_token_position)
        owner = {"CA": group.class_task(), "CS": torch.arange(group.num_classes),
                 "MT": torch.zeros(group.num_classes, dtype=torch.long)}[mode]
        self.register_buffer("ctx_owner", owner.to(backbone.device), persistent=False)

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        owner = self.ctx_owner if class_index is None else self.ctx_owner[class_index]
        emb, eot = self.class_prompts(self.ctx[owner], class_index)
        return self.backbone.text_encoder(emb, eot)
