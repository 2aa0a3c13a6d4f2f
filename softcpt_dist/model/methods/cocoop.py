"""CoCoOp (Zhou et al., CVPR 2022): CoOp whose context is shifted by a meta network of each image.

Per task ``t``: a context ``u_t`` of ``prompt.n_ctx`` vectors (from the words "a photo of a" unless
``prompt.ctx_init`` names others) and a meta network ``Linear(D_img → D_img/16) → ReLU → Linear(→ D_ctx)``
(PyTorch's default initialisation, as the official code leaves it). For image ``b`` with L2-normalised
feature ``x_b``, every class ``c`` of task ``t`` gets the prompt ``[SOS] (u_t + π_t(x_b)) <name_c> . [EOS]``;
the logit is ``exp(logit_scale) · cos(x_b, g(prompt_bc))``, so each image has its own class features.

Encoding: the prompts of one image share their ``[SOS] + context`` prefix across the task's classes, and
the shared-prefix text path (``text.path=shared_prefix``) encodes that prefix once per image and packs the
class suffixes without padding; the official code encodes every prompt at 77 positions, one image at a
time. Each rank encodes its own images' prompts (``text.shard`` has nothing to share out).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.meta_net import check_default_phrase, initial_context
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.prompts import ContextPromptBank

COCOOP_INIT = "a photo of a"  # the official CTX_INIT of its published configs


def cocoop_meta_net(image_dim: int, ctx_dim: int) -> nn.Sequential:
    """The official meta network: ``image_dim → image_dim // 16 → ctx_dim`` with a ReLU between."""
    hidden = image_dim // 16
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(image_dim, hidden)), ("relu", nn.ReLU()),
                                      ("linear2", nn.Linear(hidden, ctx_dim))]))


class CoCoOp(Method):
    name = "cocoop"
    context_inits = ("ctx_init",)
    image_conditional = True

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, prompt, method)
        prompt = replace(prompt, ctx_init=prompt.ctx_init or COCOOP_INIT)
        self.n_tasks, self.n_ctx = len(group), prompt.n_ctx
        self.ctx = initial_context(backbone, prompt.ctx_init, self.n_tasks, prompt.n_ctx, prompt.init_std,
                                   "prompt.ctx_init")
        self.meta_nets = nn.ModuleList(cocoop_meta_net(backbone.embed_dim, backbone.ctx_dim)
                                       for _ in range(self.n_tasks))
        self.class_prompts = ContextPromptBank(group.classnames, prompt.n_ctx, backbone,
                                               prompt.class_token_position)

    @classmethod
    def per_task(cls, cfg: MethodConfig) -> bool:
        return True  # trained one dataset at a time, as the official code runs it

    @classmethod
    def transfers(cls, cfg: MethodConfig, to: str) -> bool:
        return to == "classes"  # a context and meta network per task: any class of a seen task

    @classmethod
    def check(cls, method: MethodConfig, prompt: PromptConfig) -> None:
        super().check(method, prompt)
        check_default_phrase(cls.name, COCOOP_INIT, prompt)

    def contexts(self, image_features: torch.Tensor) -> torch.Tensor:
        """``[B, T, n_ctx, D_ctx]``: every task's context shifted by its meta network of each image."""
        x = F.normalize(image_features.float(), dim=-1)
        shifts = torch.stack([net(x) for net in self.meta_nets], dim=1)  # [B, T, D_ctx]
        return self.ctx.unsqueeze(0) + shifts.unsqueeze(2)

    def forward(self, class_index: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw class features ``[B, C', E]`` of the selected classes (default all) for each image."""
        if image_features is None:
            raise ValueError("method.name=cocoop: class features depend on the image; pass image_features")
        classes = torch.arange(self.num_classes, device=self.class_task.device) if class_index is None \
            else class_index.to(self.class_task.device)
        n_images, n_classes = image_features.shape[0], len(classes)
        ctx = self.contexts(image_features).reshape(n_images * self.n_tasks, self.n_ctx, -1)
        image = torch.arange(n_images, device=classes.device).unsqueeze(1)
        owner = (image * self.n_tasks + self.class_task[classes].unsqueeze(0)).flatten()  # context of (b, c)
        prompts = self.class_prompts(ctx, owner, classes.repeat(n_images))
        return self.backbone.text_encoder(prompts).view(n_images, n_classes, -1)

    def prompt_structures(self, class_index: torch.Tensor):
        """One image's prompts (a batch encodes this once per image)."""
        source, length, _ = self.class_prompts.structure(self.n_ctx, self.class_task[class_index], class_index)
        return [(source, length)]
