"""CoOp baselines on the multi-task harness.

CA: one learnable context per task (trained per task, as CoOp is); CS: one per class;
MT: a single context shared by every class of every task, trained jointly.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Optional

import torch

from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.meta_net import initial_context
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.prompts import ContextPromptBank


class CoOp(Method):
    name = "coop"
    context_inits = ("ctx_init",)

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, prompt, method)
        self.mode = mode = method.coop_mode
        n_groups = {"CA": len(group), "CS": group.num_classes, "MT": 1}[mode]
        self.ctx = initial_context(backbone, prompt.ctx_init, n_groups, prompt.n_ctx, prompt.init_std,
                                   "prompt.ctx_init")
        self.class_prompts = ContextPromptBank(group.classnames, prompt.n_ctx, backbone,
                                               prompt.class_token_position)
        owner = {"CA": group.class_task(), "CS": torch.arange(group.num_classes),
                 "MT": torch.zeros(group.num_classes, dtype=torch.long)}[mode]
        self.register_buffer("ctx_owner", owner.to(backbone.device), persistent=False)

    # Its label names the default mode too (coop-CA); a CoOp-based method's (kgcoop, prograd) only another mode
    mode_in_label: ClassVar[bool] = True

    @classmethod
    def label(cls, cfg: MethodConfig) -> str:
        if cfg.coop_mode == "CA" and not cls.mode_in_label:
            return cls.name
        return f"{cls.name}-{cfg.coop_mode}"

    @classmethod
    def transfers(cls, cfg: MethodConfig, to: str) -> bool:
        # A context per task (CA) serves its task's new classes; MT's single context any class of any task.
        return cfg.coop_mode == "MT" or (to == "classes" and cfg.coop_mode == "CA")

    @classmethod
    def per_task(cls, cfg: MethodConfig) -> bool:
        return cfg.coop_mode in ("CA", "CS")  # CoOp trains one dataset at a time

    def class_rows(self) -> Dict[str, torch.Tensor]:
        return {"ctx": self.ctx_owner} if self.ctx.requires_grad else {}

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        owner = self.ctx_owner if class_index is None else self.ctx_owner[class_index]
        return self.backbone.text_encoder(self.class_prompts(self.ctx, owner, class_index))

    def prompt_structures(self, class_index: torch.Tensor):
        source, length, _ = self.class_prompts.structure(self.class_prompts.n_ctx, self.ctx_owner[class_index],
                                                         class_index)
        return [(source, length)]
