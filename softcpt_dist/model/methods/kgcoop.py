"""KgCoOp (Yao et al., CVPR 2023): CoOp whose class text features are kept close to the hand-crafted prompt's.

The context starts from the words "a photo of a" (``prompt.ctx_init``, which may name another phrase; its
token count is ``prompt.n_ctx``) and, as CoOp CA, is one per task, each task trained on its own. The loss
adds ``w · (1 − mean_c cos(t_c, t̂_c))`` over the encoded classes, ``t_c`` the learned class feature and
``t̂_c`` frozen CLIP's feature of the task's template (``method.kg_weight`` w, 8.0 in the official commands).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.meta_net import check_default_phrase
from softcpt_dist.model.methods.coop import CoOp
from softcpt_dist.model.methods.zeroshot import template_features

KGCOOP_INIT = "a photo of a"  # the official CTX_INIT=True phrase


class KgCoOp(CoOp):
    name = "kgcoop"
    mode_in_label = False

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, replace(prompt, ctx_init=prompt.ctx_init or KGCOOP_INIT), method)
        self.kg_weight = method.kg_weight
        self.register_buffer("hand_features", template_features(backbone, group), persistent=False)

    @classmethod
    def check(cls, method: MethodConfig, prompt: PromptConfig) -> None:
        super().check(method, prompt)
        check_default_phrase(cls.name, KGCOOP_INIT, prompt)

    def class_loss_terms(self, class_features: torch.Tensor, class_index: Optional[torch.Tensor]) -> torch.Tensor:
        """``w · (1 − cos)`` between each encoded class's feature and its hand-crafted one (the loss adds
        their mean)."""
        hand = self.hand_features if class_index is None else self.hand_features[class_index]
        cos = F.cosine_similarity(class_features.float(), hand, dim=1, eps=1e-7)
        return self.kg_weight * (1.0 - cos)
