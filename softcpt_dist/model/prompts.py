"""Tokenized prompts with learnable-context slots, handed to the text encoder as ``PromptBatch``es.

A prompt ``X X ... X <name>.`` is tokenized once into a template: each position is a frozen token
(a row of the bank's token-embedding table) or a context slot, which takes a row of the context
tensor at every step (CoOp's scheme). Prompts end at their EOT: CLIP's causal mask makes later
tokens irrelevant to the EOT feature, so encoding the padded 77 positions is wasted work.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from softcpt_dist.config import ConfigError, PromptConfig, choices
from softcpt_dist.model.prompt_layout import PromptBatch

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


class _PromptTemplates(nn.Module):
    """Prompts as position templates: a token (a row of the frozen ``tokens`` table) or context slot ``j``."""

    def _store(self, backbone, ids: torch.Tensor, eot: torch.Tensor, slots: torch.Tensor) -> None:
        """``ids [P, C]`` token ids with ``slots [P, C]`` >= 0 where a context slot stands instead."""
        causal = backbone.text_encoder.causal
        length = int(eot.max()) + 1 if causal else backbone.context_length
        ids, slots = ids[:, :length], slots[:, :length]
        used, token_index = torch.unique(ids[slots < 0], return_inverse=True)
        tokens = torch.full_like(ids, -1)
        tokens[slots < 0] = token_index
        with torch.no_grad():
            table = backbone.token_embedding(used.to(backbone.device))
        self.register_buffer("tokens", table, persistent=False)
        self.register_buffer("token_of", tokens.to(backbone.device), persistent=False)
        self.register_buffer("slot_of", slots.to(backbone.device), persistent=False)
        self.register_buffer("eot", eot.to(backbone.device), persistent=False)
        # Causal towers read each prompt up to its EOT; others need the whole context.
        lengths = eot + 1 if causal else torch.full_like(eot, length)
        self.register_buffer("length", lengths.to(backbone.device), persistent=False)

    def __len__(self) -> int:
        return self.eot.shape[0]

    def structure(self, n_ctx: int, owner: Optional[torch.Tensor],
                  index: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(source, length, eot)`` of the selected prompts (``index``, default all) as a ``PromptBatch``
        has them, the context slots of prompt ``p`` taking context ``owner[p]``: no context values needed
        (what the shard planner costs, and what ``batch`` fills in)."""
        token_of, slot_of, length, eot = self.token_of, self.slot_of, self.length, self.eot
        if index is not None:
            token_of, slot_of, length, eot = token_of[index], slot_of[index], length[index], eot[index]
        width = int(length.max()) if len(length) else 0
        token_of, slot_of = token_of[:, :width], slot_of[:, :width]
        if not n_ctx:
            return token_of, length, eot
        rows = owner.to(slot_of.device).unsqueeze(1) * n_ctx + slot_of
        return torch.where(slot_of >= 0, -1 - rows, token_of), length, eot

    def batch(self, ctx: torch.Tensor, n_ctx: int, owner: Optional[torch.Tensor],
              index: Optional[torch.Tensor]) -> PromptBatch:
        if not n_ctx:
            source, length, eot = self.structure(0, None, index)
            return PromptBatch(self.tokens, self.tokens.new_zeros(0, self.tokens.shape[1]), source, length, eot)
        groups = ctx.shape[0]
        if owner is None:
            prompts = len(self) if index is None else len(index)
            if groups not in (1, prompts):
                raise ValueError(f"{groups} contexts for {prompts} prompts: say which prompt uses which")
            owner = torch.zeros(prompts, dtype=torch.long, device=ctx.device) if groups == 1 \
                else torch.arange(groups, device=ctx.device)
        source, length, eot = self.structure(n_ctx, owner, index)
        return PromptBatch(self.tokens, ctx.reshape(groups * n_ctx, -1), source, length, eot)


class TextPromptBank(_PromptTemplates):
    """Fixed prompts (no learnable slots), e.g. zero-shot templates."""

    def __init__(self, texts: Sequence[str], backbone):
        super().__init__()
        ids, eot = tokenize(backbone.tokenizer, texts, backbone.context_length)
        self._store(backbone, ids, eot, torch.full_like(ids, -1))

    def forward(self, index: Optional[torch.Tensor] = None) -> PromptBatch:
        return self.batch(self.tokens.new_zeros(0), 0, None, index)


class ContextPromptBank(_PromptTemplates):
    """Prompts ``X×n_ctx <name>.`` whose ``X`` slots take context vectors (CoOp's scheme).

    ``forward(ctx, owner, index)``: ``ctx [G, n_ctx, D]`` holds G contexts (``[n_ctx, D]``: one for
    all) and ``owner [P']`` says which one each selected prompt (``index``, default all) uses; by
    default one context for all prompts, or one each. Prompts that share a context share their
    leading positions, which the shared-prefix text path encodes once.
    """

    def __init__(self, names: Sequence[str], n_ctx: int, backbone, position: str = "end",
                 key: str = "class_token_position"):
        """``position``: where the name goes among the slots (end, middle, front; ``key`` names the config
        field it came from in errors)."""
        super().__init__()
        if position not in choices(PromptConfig, "class_token_position"):
            raise ConfigError(f"prompt.{key}={position!r} is not one of "
                              f"{list(choices(PromptConfig, 'class_token_position'))}")
        self.n_ctx, self.position = n_ctx, position
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        texts = [f"{prefix} {name}." if n_ctx else f"{name}." for name in names]
        ids, eot = tokenize(backbone.tokenizer, texts, backbone.context_length)
        slots = torch.full_like(ids, -1)
        slots[:, 1:1 + n_ctx] = torch.arange(n_ctx)
        if position != "end" and n_ctx:
            for i, name in enumerate(names):  # move the name tokens before (front) or among (middle) the slots
                ids[i], slots[i] = self._place(ids[i], slots[i], len(backbone.tokenizer.encode(name)))
        self._store(backbone, ids, eot, slots)

    def _place(self, ids: torch.Tensor, slots: torch.Tensor, name_len: int):
        n, lead = self.n_ctx, (0 if self.position == "front" else self.n_ctx // 2)
        name = slice(1 + n, 1 + n + name_len)
        order = torch.cat([torch.arange(0, 1 + lead), torch.arange(name.start, name.stop),
                           torch.arange(1 + lead, 1 + n), torch.arange(name.stop, len(ids))])
        return ids[order], slots[order]

    def forward(self, ctx: torch.Tensor, owner: Optional[torch.Tensor] = None,
                index: Optional[torch.Tensor] = None) -> PromptBatch:
        ctx = ctx.unsqueeze(0) if ctx.dim() == 2 else ctx
        if ctx.shape[1:2] != (self.n_ctx,):
            raise ValueError(f"context of shape {tuple(ctx.shape)} for prompts with {self.n_ctx} slots")
        return self.batch(ctx, self.n_ctx, owner, index)
