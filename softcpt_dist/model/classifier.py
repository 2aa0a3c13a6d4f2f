"""Frozen backbone + prompt method as one module: images -> per-task cosine logits.

One top-level module owns every parameter (frozen and learnable), so a ZeRO-3 engine can wrap it;
all CLIP computation happens inside submodule ``forward()`` calls.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from softcpt_dist.model.loss import cosine_logits


def encode_images(backbone: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Frozen image features of a batch: images ``[B, C, H, W]`` are encoded, cached features
    ``[B, D]`` (from the feature cache) pass through."""
    if inputs.dim() == 2:
        return inputs.to(backbone.device)
    with torch.no_grad():
        return backbone.image_encoder(inputs)


class PromptClassifier(nn.Module):
    """``forward(images)`` -> cosine logits over the method's classes; the backbone never trains."""

    def __init__(self, backbone: nn.Module, method: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.method = method

    def forward(self, images: Optional[torch.Tensor] = None, *, image_features: Optional[torch.Tensor] = None,
                class_features: Optional[torch.Tensor] = None,
                class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, C']``. ``images`` may already be cached features ``[B, D]`` (2-D inputs skip the
        image encoder); pass ``image_features``/``class_features`` to skip an encoder explicitly."""
        if image_features is None:
            image_features = encode_images(self.backbone, images)
        if class_features is None:
            class_features = self.method(class_index)
        return cosine_logits(image_features, class_features, self.backbone.logit_scale)

    def learnable_parameters(self) -> Dict[str, nn.Parameter]:
        return self.method.learnable_parameters()

    def learnable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.learnable_parameters().items()}

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(False)
        return self
