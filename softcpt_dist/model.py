"""Frozen backbone + prompt method as one module: images -> per-task cosine logits.

One top-level module owns every parameter (frozen and learnable), so a ZeRO-3 engine can wrap it;
all CLIP computation happens inside submodule ``forward()`` calls.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from softcpt_dist.loss import cosine_logits


class PromptClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, method: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.method = method

    def forward(self, images: Optional[torch.Tensor] = None, *, image_features: Optional[torch.Tensor] = None,
                class_features: Optional[torch.Tensor] = None,
                class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, C']``. Pass precomputed ``image_features``/``class_features`` to skip an encoder."""
        if image_features is None:
            with torch.no_grad():
                image_features = self.backbone.image_encoder(images)
        if class_features is None:
            class_features = self.method(class_index)
        return cosine_logits(image_features, class_features, self.backbone.logit_scale)

    def learnable_parameters(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.method.named_parameters() if p.requires_grad}

    def learnable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.learnable_parameters().items()}

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(False)
        return self
