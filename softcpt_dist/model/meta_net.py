"""SoftCPT's learnable pieces besides the prompts: context vectors and the meta network.

The meta network maps a task feature (optionally concatenated with a class feature) to the
``N`` context vectors of that task's (or class's) prompt. The paper's default is one bias-free
linear layer with N(0, 0.02) init.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcpt_dist.config import ConfigError, PromptConfig
from softcpt_dist.model.batch_invariance import rowwise
from softcpt_dist.model.gradient_factors import GradientFactors, factored_linear


def context_vectors(n_groups: int, n_ctx: int, dim: int, std: float) -> nn.Parameter:
    """``[n_groups, n_ctx, dim]`` learnable context, N(0, std) init (CoOp's random init)."""
    ctx = torch.empty(n_groups, n_ctx, dim)
    nn.init.normal_(ctx, std=std)
    return nn.Parameter(ctx)


def word_context(backbone, words: str, n_groups: int, n_ctx: int, key: str) -> nn.Parameter:
    """``[n_groups, n_ctx, dim]`` learnable context whose every row starts as the token embeddings of
    ``words`` (CoOp's ``CTX_INIT``; "_" reads as a space). ``key`` names the setting in errors."""
    ids = backbone.tokenizer.encode(words.replace("_", " "))
    if len(ids) != n_ctx:
        count = {"prompt.ctx_init": "n_ctx", "prompt.task_ctx_init": "n_task_ctx"}.get(key, "n_class_ctx")
        raise ConfigError(f"{key}={words!r} is {len(ids)} token(s), the context has prompt.{count}={n_ctx}: "
                          f"set prompt.{count}={len(ids)}")
    with torch.no_grad():
        embedding = backbone.token_embedding(torch.tensor(ids, device=backbone.device)).float().cpu()
    return nn.Parameter(embedding.unsqueeze(0).repeat(n_groups, 1, 1))


def check_default_phrase(method: str, phrase: str, prompt: PromptConfig) -> None:
    """A method whose context starts from ``phrase`` unless ``prompt.ctx_init`` names another: without one,
    ``prompt.n_ctx`` must be the phrase's token count (its words here: single-token words)."""
    words = len(phrase.split())
    if prompt.ctx_init is None and prompt.n_ctx != words:
        raise ConfigError(f"method.name={method} starts its context from {phrase!r} ({words} tokens): set "
                          f"prompt.n_ctx={words} (it is {prompt.n_ctx}), or prompt.ctx_init to a phrase of "
                          f"{prompt.n_ctx} tokens")


def initial_context(backbone, words: Optional[str], n_groups: int, n_ctx: int, std: float, key: str) -> nn.Parameter:
    """A learnable context from ``words`` (``word_context``) or, without them, N(0, std); fp16 in
    ``model.precision=official_fp16`` (the official code creates its contexts in CLIP's dtype)."""
    ctx = word_context(backbone, words, n_groups, n_ctx, key) if words else \
        context_vectors(n_groups, n_ctx, backbone.ctx_dim, std)
    return nn.Parameter(ctx.detach().half()) if getattr(backbone, "official_fp16", False) else ctx


class MetaNet(nn.Module):
    """Feature ``[B, in_dim]`` -> context ``[B, n_ctx, ctx_dim]``.

    ``lin``: one bias-free linear layer (the paper; weight N(0, 0.02)). ``mlp``: linear-ReLU-linear
    with biases (an extension; not in the paper or the official code).
    """

    def __init__(self, in_dim: int, n_ctx: int, ctx_dim: int, kind: str = "lin", hidden: int = 512,
                 init_std: float = 0.02, key_count: Optional[int] = None, dense_in: int = 0,
                 key_group: Optional[torch.Tensor] = None):
        super().__init__()
        self.key_count = key_count  # how many distinct rows (tasks or classes) forward's keys name
        # Gradient factors by the input's parts (``gradient_factors.py``): the leading ``dense_in`` columns per
        # row (a class feature), the rest shared by the keys of one group (``key_group [key_count]``: a task).
        self.dense_in, self.key_group = dense_in, key_group
        self.n_ctx, self.ctx_dim, self.kind = n_ctx, ctx_dim, kind
        out_dim = n_ctx * ctx_dim
        if kind == "lin":
            self.net = nn.Linear(in_dim, out_dim, bias=False)
            nn.init.normal_(self.net.weight, std=init_std)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
            for layer in (self.net[0], self.net[2]):
                nn.init.normal_(layer.weight, std=init_std)
                nn.init.zeros_(layer.bias)
        else:
            raise ValueError(f"unknown meta network kind {kind!r} (lin | mlp)")
        # Set by ``record_factors`` (the training engine's structured gradient exchange; lin only): the weight's
        # gradient is then recorded as its factors, by key, not formed (``gradient_factors.py``).
        self.factors: Optional[GradientFactors] = None

    def _factor_layouts(self):
        if self.kind != "lin" or self.key_count is None:
            return []
        layouts = [{}]  # a table row per key
        if self.dense_in and self.key_group is not None:
            layouts.append({"dense_in": self.dense_in, "key_group": self.key_group})  # split by the input's parts
        return layouts

    def _layout_elements(self, layout) -> int:
        return GradientFactors(self.key_count, *self.net.weight.shape, **layout).numel()  # allocates nothing

    def factor_elements(self) -> Optional[int]:
        """Numbers the cheapest layout of gradient factors exchanges, or None where forming and summing the
        weight's matrix is cheaper (or the network has no keyed linear weight)."""
        layouts = self._factor_layouts()
        if not layouts:
            return None
        cheapest = min(self._layout_elements(layout) for layout in layouts)
        return cheapest if cheapest < self.net.weight.numel() else None

    def record_factors(self) -> GradientFactors:
        """From now on, backward records the weight's gradient factors by key instead of forming it (the
        cheapest layout, ``factor_elements``)."""
        layouts = self._factor_layouts()
        if not layouts:
            raise ValueError("gradient factors need a linear meta network whose rows have keys (key_count)")
        layout = min(layouts, key=self._layout_elements)
        out_f, in_f = self.net.weight.shape
        self.factors = GradientFactors(self.key_count, out_f, in_f, **layout)
        return self.factors

    def forward(self, features: torch.Tensor, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``keys [B]``: which task or class each row is (below ``key_count``); needed while recording factors."""
        recording = self.factors is not None and torch.is_grad_enabled()
        if recording and (keys is None or len(keys) != features.shape[0]):
            raise ValueError("a meta network recording gradient factors needs one key per row")
        if features.dtype == torch.float16 and self.kind == "lin":  # model.precision=official_fp16
            # the official PromptGen: x @ proj.type(x.dtype), the fp32 weight applied in fp16
            weight, x = self.net.weight.to(torch.float16), features
        elif recording:
            weight = self.net.weight
            x = features.to(weight.dtype)
        else:
            out = rowwise(self.net, features.to(next(self.parameters()).dtype))
            return out.view(features.shape[0], self.n_ctx, self.ctx_dim)
        if recording:  # the weight's gradient as factors (fp32, from fp16 rows in official_fp16)
            out = rowwise(lambda rows: factored_linear(rows, weight, self.factors, keys), x)
        else:
            out = rowwise(lambda rows: F.linear(rows, weight), x)
        return out.view(features.shape[0], self.n_ctx, self.ctx_dim)
