"""The frozen CLIP text transformer, applied to token embeddings that prompts assemble.

Taking embeddings (not token ids) is what lets learnable context vectors stand in prompt slots.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from softcpt_dist.config import ConfigError


def text_tower(model: nn.Module) -> nn.Module:
    """The object that owns the text transformer: the CLIP itself, or ``model.text`` for custom-text models."""
    tower = getattr(model, "text", None) or model
    if not hasattr(tower, "transformer") or not hasattr(tower, "token_embedding"):
        raise ConfigError(
            f"{type(model).__name__}: only open_clip text towers built from token embeddings are supported "
            "(Hugging Face text towers are not)"
        )
    if getattr(tower, "cls_emb", None) is not None:
        raise ConfigError("text towers with an appended CLS embedding (CoCa) are not supported")
    return tower


class TextEncoder(nn.Module):
    """Frozen CLIP text transformer applied to given token embeddings.

    ``forward(embeddings, eot_positions)`` returns the raw (unnormalized) projected feature at
    each sequence's EOT token. Sequences may be shorter than the context length: under CLIP's
    causal mask, tokens after the EOT cannot change the EOT feature, so callers pass only the
    first ``max(eot) + 1`` positions.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        tower = text_tower(model)
        self.transformer = tower.transformer
        self.positional_embedding = tower.positional_embedding
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        mask = getattr(tower, "attn_mask", None)
        self.causal = mask is not None
        self.register_buffer("attn_mask", mask, persistent=False)
        self.context_length = self.positional_embedding.shape[0]
        self.width = self.positional_embedding.shape[1]
        if isinstance(self.text_projection, nn.Linear):
            self.output_dim = self.text_projection.out_features
        else:
            self.output_dim = self.text_projection.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.positional_embedding.dtype

    def forward(self, embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        batch, length, width = embeddings.shape
        if width != self.width:
            raise ValueError(f"text embeddings have width {width}, the text encoder expects {self.width}")
        if length > self.context_length:
            raise ValueError(f"sequence length {length} exceeds the context length {self.context_length}")
        if not self.causal and length != self.context_length:
            raise ValueError("this text encoder has no causal mask: sequences must span the full context")
        dtype = self.dtype
        x = embeddings.to(dtype) + self.positional_embedding[:length].to(dtype)
        mask = self.attn_mask[:length, :length] if self.causal else None
        x = self.transformer(x, attn_mask=mask)
        # LayerNorm acts per token, so pooling first and normalizing one token is exact and cheaper.
        x = x[torch.arange(batch, device=x.device), eot_positions.to(x.device)]
        x = self.ln_final(x)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection
