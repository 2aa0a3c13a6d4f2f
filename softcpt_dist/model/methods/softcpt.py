"""SoftCPT: a meta network turns task (and class) features into each task's prompt context.

Variants (paper Sec. 3): the first two letters say how the meta network sees classes --
NA: not class-aware (context per task); CA: class-aware with one class context shared by all
classes; CS: class-aware with a class-specific class context. The last two say whether the task
context is shared by all tasks (TA) or task-specific (TS).
"""

from __future__ import annotations

from typing import Optional

import torch

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.meta_net import MetaNet, context_vectors
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.prompts import ContextPromptBank


class SoftCPT(Method):
    name = "softcpt"

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, prompt, method)
        variant = method.variant
        self.variant = variant
        self.class_aware = variant[:2] in ("CA", "CS")
        self.class_specific = variant[:2] == "CS"
        self.task_specific = variant[2:] == "TS"
        dim, feat = backbone.ctx_dim, backbone.embed_dim
        n_tasks, n_classes = len(group), group.num_classes

        self.task_prompts = ContextPromptBank(group.task_names, prompt.n_task_ctx, backbone)
        self.task_ctx = context_vectors(n_tasks if self.task_specific else 1, prompt.n_task_ctx, dim, prompt.init_std)
        if self.class_aware:
            self.class_feature_prompts = ContextPromptBank(group.classnames, prompt.n_class_ctx, backbone)
            self.class_ctx = context_vectors(n_classes if self.class_specific else 1, prompt.n_class_ctx, dim,
                                             prompt.init_std)
        self.meta_net = MetaNet(feat * (2 if self.class_aware else 1), prompt.n_ctx, dim, method.meta_net,
                                method.meta_hidden, prompt.init_std)
        self.class_prompts = ContextPromptBank(group.classnames, prompt.n_ctx, backbone,
                                               prompt.class_token_position)
        self.register_buffer("class_task", group.class_task().to(backbone.device), persistent=False)

    @classmethod
    def label(cls, cfg: MethodConfig) -> str:
        return f"softcpt-{cfg.variant}"

    @classmethod
    def check(cls, method: MethodConfig, prompt: PromptConfig) -> None:
        if method.variant[:2] in ("CA", "CS") and prompt.n_class_ctx == 0:
            raise ConfigError(f"method.variant={method.variant} needs prompt.n_class_ctx > 0")

    @property
    def official_module_count(self) -> int:
        """Modules the official code registers with one shared optimizer (see optim.py)."""
        return 4 if self.class_aware else 3

    def task_features(self) -> torch.Tensor:
        """Raw text feature of every task prompt ``[T, E]``; recomputed each step (u learns)."""
        ctx = self.task_ctx.expand(len(self.task_prompts), -1, -1)
        emb, eot = self.task_prompts(ctx)
        return self.backbone.text_encoder(emb, eot)

    def contexts(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Context vectors of the selected global classes ``[C', N, D]``."""
        class_task = self.class_task if class_index is None else self.class_task[class_index]
        task_feat = self.task_features().float()
        if not self.class_aware:
            return self.meta_net(task_feat)[class_task]
        n = len(self.class_prompts) if class_index is None else class_index.shape[0]
        class_ctx = self.class_ctx if self.class_specific else self.class_ctx.expand(len(self.class_prompts), -1, -1)
        if class_index is not None:
            class_ctx = class_ctx[class_index]
        emb, eot = self.class_feature_prompts(class_ctx.expand(n, -1, -1), class_index)
        class_feat = self.backbone.text_encoder(emb, eot).float()
        # Official order: class feature first, then the feature of the class's task.
        return self.meta_net(torch.cat([class_feat, task_feat[class_task]], dim=1))

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb, eot = self.class_prompts(self.contexts(class_index), class_index)
        return self.backbone.text_encoder(emb, eot)
