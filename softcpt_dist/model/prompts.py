"""Tokenized prompts with learnable-context slots, and their assembly into token embeddings.

A prompt ``X X ... X <name>.`` is tokenized once; its frozen token embeddings are stored as
buffers and the ``X`` slots are replaced by context vectors at every step (CoOp's scheme). All
stored sequences are cut after the longest EOT among the prompts: CLIP's causal mask makes the
tokens after a prompt's EOT irrelevant to its EOT feature, so encoding the padded 77 positions
is wasted work.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from softcpt_dist.config import ConfigError, PromptConfig, choices

PLACEHOLDER = "X"


def tokenize(tokenizer, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[P, context_length]`` and each prompt's EOT position; over-long prompts are errors."""
    ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    eot = torch.zeros(len(texts), dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [tokenizer.sot_token_id] + tokenizer.encode(text) + [tokenizer.eot_token_id]
        if len(tokens) > context_length:
            raise ConfigError(f"prompt {text!r} has {len(tokens)} tokens, more than the context length "
                              f"{context_length}; shorten the name or use fewer context tokens")
        ids[i, : len(tokens)] = torch.tensor(tokens)
        eot[i] = len(tokens) - 1
    return ids, eot


class TextPromptBank(nn.Module):
    """Fixed prompts (no learnable slots), e.g. zero-shot templates: embeddings + EOT positions."""

    def __init__(self, texts: Sequence[str], backbone, device=None):
        super().__init__()
        ids, eot = tokenize(backbone.tokenizer, texts, backbone.context_length)
        length = int(eot.max()) + 1 if backbone.text_encoder.causal else backbone.context_length
        device = device or backbone.device
        with torch.no_grad():
            emb = backbone.token_embedding(ids[:, :length].to(device))
        self.register_buffer("embeddings", emb, persistent=False)
        self.register_buffer("eot", eot.to(device), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embeddings, self.eot


class ContextPromptBank(nn.Module):
    """Prompts ``X×n_ctx <name>.`` whose ``X`` slots take context vectors.

    ``forward(ctx, index)`` returns the token embeddings ``[P', L, D]`` of the selected prompts
    (all by default), with ``ctx`` of shape ``[P', n_ctx, D]``, and their EOT positions; ``L`` is
    the longest selected EOT + 1.
    """

    def __init__(self, names: Sequence[str], n_ctx: int, backbone, position: str = "end"):
        super().__init__()
        if position not in choices(PromptConfig, "class_token_position"):
            raise ConfigError(f"prompt.class_token_position={position!r} is not one of "
                              f"{list(choices(PromptConfig, 'class_token_position'))}")
        self.n_ctx = n_ctx
        self.position = position
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        texts = [f"{prefix} {name}." if n_ctx else f"{name}." for name in names]
        ids, eot = tokenize(backbone.tokenizer, texts, backbone.context_length)
        self.full_length = backbone.context_length
        self.truncate = backbone.text_encoder.causal
        length = int(eot.max()) + 1 if self.truncate else self.full_length
        device = backbone.device
        with torch.no_grad():
            emb = backbone.token_embedding(ids[:, :length].to(device))
        # name_lens: tokens of "<name>" (without the period), needed for middle/front placement.
        name_lens = torch.tensor([len(backbone.tokenizer.encode(n)) for n in names], dtype=torch.long)
        self.register_buffer("prefix", emb[:, :1], persistent=False)  # SOS
        self.register_buffer("suffix", emb[:, 1 + n_ctx:], persistent=False)  # name . EOT pad
        self.register_buffer("eot", eot.to(device), persistent=False)
        self.register_buffer("name_lens", name_lens.to(device), persistent=False)

    def __len__(self) -> int:
        return self.eot.shape[0]

    def forward(self, ctx: torch.Tensor, index: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        prefix, suffix, eot, name_lens = self.prefix, self.suffix, self.eot, self.name_lens
        if index is not None:
            prefix, suffix, eot, name_lens = prefix[index], suffix[index], eot[index], name_lens[index]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
        if ctx.shape[:2] != (prefix.shape[0], self.n_ctx):
            raise ValueError(f"context of shape {tuple(ctx.shape)} for {prefix.shape[0]} prompts "
                             f"with {self.n_ctx} slots")
        ctx = ctx.to(prefix.dtype)
        if self.position == "end" or self.n_ctx == 0:
            emb = torch.cat([prefix, ctx, suffix], dim=1)
        else:
            emb = torch.stack([self._place(prefix[i], ctx[i], suffix[i], int(name_lens[i]))
                               for i in range(prefix.shape[0])])
        if self.truncate:
            emb = emb[:, : int(eot.max()) + 1]
        return emb, eot

    def _place(self, prefix, ctx, suffix, name_len):
        name, rest = suffix[:name_len], suffix[name_len:]
        if self.position == "front":
            return torch.cat([prefix, name, ctx, rest], dim=0)
        half = self.n_ctx // 2
        return torch.cat([prefix, ctx[:half], name, ctx[half:], rest], dim=0)
