"""The frozen CLIP text transformer, applied to prompts that mix token embeddings and context vectors.

Taking embeddings (not token ids) is what lets learnable context vectors stand in prompt slots.
Two exact paths (``text.path``): ``dense`` runs every prompt as a padded sequence (cut after the
longest EOT); ``shared_prefix`` encodes each shared leading run of positions once and the rest
packed without padding (``prompt_layout.py`` says why that is exact). Both run the same blocks:
the open_clip block's own modules, with its attention projections taken over by ``Attention`` so
that every weight is used inside the ``forward()`` of the module that owns it (ZeRO-3 gathers
partitioned weights only there).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from softcpt_dist.config import ConfigError, TextConfig, choices
from softcpt_dist.model.batch_invariance import rowwise
from softcpt_dist.model.prompt_layout import (LayoutCache, PromptBatch, SharedPrefixLayout, prompt_assembly,
                                              structure_key, tree_positions)
from softcpt_dist.model.tree_attention import shared_prefix_attention

logger = logging.getLogger(__name__)


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
    pool = getattr(tower, "pool_type", None) or getattr(tower, "text_pool_type", "argmax")  # CustomTextCLIP / CLIP
    if pool != "argmax":
        raise ConfigError(f"text towers pooled by pool_type={pool!r} are not supported: prompt features are read "
                          "at the end-of-text token (pool_type='argmax')")
    return tower


class Attention(nn.Module):
    """Multi-head self-attention with the weights of an ``nn.MultiheadAttention``, over padded sequences
    ``[B, L, D]`` (causal) or over the packed node rows of a shared-prefix layout."""

    def __init__(self, mha: nn.MultiheadAttention, causal: bool = True, kernels: str = "auto"):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_bias is None or mha.bias_k is not None:
            raise ConfigError("text attention with separate or bias-free q/k/v projections is not supported")
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.heads, self.causal, self.kernels = mha.num_heads, causal, kernels

    def forward(self, x: torch.Tensor, layout: Optional[SharedPrefixLayout] = None) -> torch.Tensor:
        width = x.shape[-1]
        if layout is None:  # [B, L, D], causal
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
            b, length = x.shape[:2]
            q, k, v = qkv.view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            return self.out_proj(out.transpose(1, 2).reshape(b, length, width))
        # Packed node rows: a few task prompts alone can be fewer rows than BLAS's small-product switch.
        qkv = rowwise(lambda rows: F.linear(rows, self.in_proj_weight, self.in_proj_bias), x)
        return rowwise(self.out_proj, shared_prefix_attention(qkv, layout, self.heads, self.kernels))


class TextBlock(nn.Module):
    """One open_clip ``ResidualAttentionBlock`` (its layer norms, MLP and layer scales) with ``Attention``."""

    def __init__(self, block: nn.Module, causal: bool = True, kernels: str = "auto"):
        super().__init__()
        if hasattr(block, "ln_1_kv") or not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise ConfigError(f"text block {type(block).__name__} is not a plain CLIP attention block")
        self.ln_1, self.attn, self.ls_1 = block.ln_1, Attention(block.attn, causal, kernels), block.ls_1
        self.ln_2, self.mlp, self.ls_2 = block.ln_2, block.mlp, block.ls_2

    def forward(self, x: torch.Tensor, layout: Optional[SharedPrefixLayout] = None) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), layout))
        if layout is None:
            return x + self.ls_2(self.mlp(self.ln_2(x)))
        return x + self.ls_2(rowwise(self.mlp, self.ln_2(x)))  # packed rows: see Attention.forward


class TextEncoder(nn.Module):
    """Frozen CLIP text transformer; returns the raw (unnormalized) projected feature at each prompt's EOT.

    ``forward(batch)`` takes a ``PromptBatch`` and encodes it by ``path``; ``forward(embeddings,
    eot_positions)`` takes padded token embeddings ``[B, L, D]`` (L at most the context length;
    under the causal mask, tokens after the EOT cannot change the EOT feature, so callers may pass
    only the first ``max(eot) + 1`` positions).
    """

    def __init__(self, model: nn.Module, path: str = "shared_prefix", batch_invariant: bool = True,
                 kernels: str = "auto"):
        super().__init__()
        if path not in choices(TextConfig, "path"):
            raise ConfigError(f"text.path={path!r} is not one of {list(choices(TextConfig, 'path'))}")
        tower = text_tower(model)
        self.causal = getattr(tower, "attn_mask", None) is not None
        self.blocks = nn.ModuleList(TextBlock(block, self.causal, kernels) for block in tower.transformer.resblocks)
        self.grad_checkpointing = False
        self.kernels = kernels
        self.positional_embedding = tower.positional_embedding
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        if path == "shared_prefix" and not self.causal:
            logger.info("text tower without a causal mask: text.path=dense (shared prefixes need causal attention)")
            path = "dense"
        self.path = path
        self.context_length = self.positional_embedding.shape[0]
        self.width = self.positional_embedding.shape[1]
        if isinstance(self.text_projection, nn.Linear):
            self.output_dim = self.text_projection.out_features
        else:
            self.output_dim = self.text_projection.shape[1]
        self._layouts = LayoutCache(batch_invariant=batch_invariant)
        self._costs: Dict[bytes, int] = {}
        # The text-side work done so far (the profiler's FLOP count): token positions (per layer),
        # attention (query, key) pairs (per layer) and projected features.
        self.positions_encoded = self.pairs_encoded = self.features_encoded = 0

    @property
    def dtype(self) -> torch.dtype:
        """The blocks' compute dtype (an OpenAI-style fp16 conversion keeps the embeddings in fp32)."""
        return self.blocks[0].attn.in_proj_weight.dtype if len(self.blocks) else self.positional_embedding.dtype

    def forward(self, prompts: Union[PromptBatch, torch.Tensor],
                eot_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(prompts, PromptBatch):
            if self.path == "shared_prefix":
                return self._shared_prefix(prompts)
            prompts, eot_positions = prompts.dense()
        return self._dense(prompts, eot_positions)

    def positions(self, source: torch.Tensor, length: torch.Tensor) -> int:
        """Token positions (per layer) that encoding prompts of this structure costs on this encoder's path
        (as ``PromptBatch.source``/``length``; what the class-shard planner balances)."""
        if self.path == "dense" or len(length) == 0:
            return int(source.shape[0]) * (int(length.max()) if len(length) else 0)
        source, length = source.detach().cpu(), length.detach().cpu()
        key = structure_key(source, length)
        if key not in self._costs:
            if len(self._costs) > 4096:
                self._costs.clear()
            self._costs[key] = tree_positions(source, length)
        return self._costs[key]

    def set_kernels(self, enabled: str) -> None:
        """``kernels.enabled`` for this encoder's prompt assembly and shared-prefix attention."""
        self.kernels = enabled
        for block in self.blocks:
            block.attn.kernels = enabled

    def layout(self, prompts: PromptBatch) -> SharedPrefixLayout:
        return self._layouts.get(prompts.source, prompts.length, prompts.source.device)

    def _run_blocks(self, x: torch.Tensor, layout: Optional[SharedPrefixLayout]) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
        return x

    def _shared_prefix(self, prompts: PromptBatch) -> torch.Tensor:
        layout = self.layout(prompts)
        self.positions_encoded += layout.positions
        self.pairs_encoded += layout.attention_pairs
        self.features_encoded += len(layout.eot_nodes)
        x = prompt_assembly(prompts.tokens, prompts.ctx, self.positional_embedding,
                            layout.node_source, layout.node_depth, self.dtype, self.kernels)
        return self._project(self._run_blocks(x, layout)[layout.eot_nodes])

    def _dense(self, embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        batch, length, width = embeddings.shape
        if width != self.width:
            raise ValueError(f"text embeddings have width {width}, the text encoder expects {self.width}")
        if length > self.context_length:
            raise ValueError(f"sequence length {length} exceeds the context length {self.context_length}")
        if not self.causal and length != self.context_length:
            raise ValueError("this text encoder has no causal mask: sequences must span the full context")
        dtype = self.dtype
        self.positions_encoded += batch * length
        self.pairs_encoded += batch * (length * (length + 1) // 2 if self.causal else length * length)
        self.features_encoded += batch
        x = self._run_blocks(embeddings.to(dtype) + self.positional_embedding[:length].to(dtype), None)
        # LayerNorm acts per token, so pooling first and normalizing one token is exact and cheaper.
        return self._project(x[torch.arange(batch, device=x.device), eot_positions.to(x.device)])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_final(x)
        if isinstance(self.text_projection, nn.Linear):
            return rowwise(self.text_projection, x)
        return rowwise(lambda rows: rows @ self.text_projection, x)
