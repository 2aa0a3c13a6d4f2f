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


def image_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, 1 + M, E]``: the pooled feature, then the M local features (see the module docstring)."""
    param = next(visual.parameters())
    x = images.to(device=param.device, dtype=param.dtype)
    if type(visual).__name__ == "ModifiedResNet":
        return _resnet_tokens(visual, x)
    x = visual.transformer(visual._embeds(x))
    x = visual.ln_post(x)
    return x @ visual.proj if visual.proj is not None else x


def _resnet_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
    pool = visual.attnpool
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # [HW, B, C]
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out.permute(1, 0, 2)
