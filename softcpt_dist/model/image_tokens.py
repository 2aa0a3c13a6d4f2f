"""Per-position image features: the pooled feature and one feature per spatial position, in the embedding space.

PLOT matches a class's prompts to an image's local features. For a ResNet tower (CLIP's ``ModifiedResNet``) they
are the attention pool's outputs with every position as a query, as PLOT's code computes them: row 0 is the
mean-token query, CLIP's own pooled feature, rows 1..HW one per cell of the last feature map (7×7 for RN50 at 224
pixels). For a ViT (``pool_type='tok'``) they are every token after the final layer norm, projected: row 0 the
class token (CLIP's feature), rows 1.. the patches. Other towers have no such features and are refused by name.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def local_features_refusal(visual: nn.Module) -> Optional[str]:
    """Why ``visual`` cannot give per-position features (None when it can)."""
    kind = type(visual).__name__
    if kind == "ModifiedResNet" and hasattr(visual, "attnpool"):
        return None
    if kind == "VisionTransformer":
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            return f"{kind} with attentional pooling or a layer norm after pooling has no per-patch features in its embedding space"
        if getattr(visual, "pool_type", "tok") != "tok":
            return f"{kind} pools with {visual.pool_type!r}, not its class token"
        return None
    return f"{kind} (only CLIP's ResNet and ViT towers)"


class ResNetTokens(nn.Module):
    """The attention pool of a ``ModifiedResNet`` with every position as a query. It holds the pool's weights as
    its own (the same tensors), so that ZeRO-3 gathers them for its forward; the trunk runs through its modules."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.__dict__["visual"] = visual  # not a submodule: the image encoder owns the tower
        pool = visual.attnpool
        self.num_heads = pool.num_heads
        self.positional_embedding = pool.positional_embedding
        self.q_weight, self.k_weight, self.v_weight = pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight
        self.q_bias, self.k_bias, self.v_bias = pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias
        self.c_weight, self.c_bias = pool.c_proj.weight, pool.c_proj.bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        images = images.to(device=self.q_weight.device, dtype=v.conv1.weight.dtype)
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # [HW, B, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_weight, k_proj_weight=self.k_weight, v_proj_weight=self.v_weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_bias, self.k_bias, self.v_bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_weight,
            out_proj_bias=self.c_bias, use_separate_proj_weight=True, training=False, need_weights=False)
        return out.permute(1, 0, 2)


class ViTTokens(nn.Module):
    """Every token of a ViT after its final layer norm, projected. It holds the tower's own tensors (class and
    positional embeddings, projection), so that ZeRO-3 gathers them for its forward."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.__dict__["visual"] = visual
        self.class_embedding, self.positional_embedding = visual.class_embedding, visual.positional_embedding
        self.proj = visual.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        images = images.to(device=self.proj.device if self.proj is not None else self.class_embedding.device,
                           dtype=v.conv1.weight.dtype)
        x = v.ln_post(v.transformer(v._embeds(images)))
        return x @ self.proj if self.proj is not None else x


def local_image_features(visual: nn.Module) -> Optional[nn.Module]:
    """The module giving ``visual``'s ``[B, 1 + M, E]`` features (None where ``local_features_refusal`` says why
    not)."""
    if local_features_refusal(visual) is not None:
        return None
    return ResNetTokens(visual) if type(visual).__name__ == "ModifiedResNet" else ViTTokens(visual)

