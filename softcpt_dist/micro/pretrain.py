"""Contrastive pre-training of a small open_clip CLIP on the micro world (``softcpt-dist pretrain-micro``).

Every step draws a fresh batch of scenes from the pre-training distribution (held-out attribute pairs
never appear), renders them, writes each a caption, and takes one AdamW step on CLIP's symmetric
InfoNCE loss. The result is an ordinary open_clip state dict, loaded like any local weights file
(``model.pretrained=<file>``); ``model.pretrained=micro`` names the cached file of the current settings
and pre-trains it on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

import softcpt_dist  # noqa: F401  (applies the torchvision import shim before open_clip)
import open_clip

from softcpt_dist.config import MicroPretrainConfig, ModelConfig
from softcpt_dist.model.backbone import ensure_builtin_configs
from softcpt_dist import distributed as D
from softcpt_dist.files import atomic_torch_save, atomic_write_text, exclusive
from softcpt_dist.micro.world import WORLD_VERSION, caption, render_batch, sample_scene, vocabulary
from softcpt_dist.progress import progress

logger = logging.getLogger(__name__)
_WORDS = re.compile(r"[a-z]+|\.")


def weights_path(arch: str, cfg: MicroPretrainConfig) -> Path:
    """Where the micro CLIP of ``arch`` and these settings is cached: the name hashes every setting that
    changes the weights."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("dir", "log_every")}
    key = json.dumps({"arch": arch, "world": WORLD_VERSION, **settings}, sort_keys=True)
    return Path(cfg.dir) / f"clip-{arch}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt"


def micro_clip(arch: str, cfg: MicroPretrainConfig, show_progress: bool = True) -> Path:
    """The cached micro CLIP of ``arch`` and ``cfg``, pre-trained first if missing: by rank 0 (the other
    ranks wait), and by one job of several that need it (a file lock)."""
    path = weights_path(arch, cfg)
    if D.rank() == 0:
        with exclusive(path):
            if not path.is_file():
                logger.info("model.pretrained=micro: no cached micro CLIP at %s; pre-training it now", path)
                pretrain(arch, cfg, path, show_progress)
    D.barrier()
    return path


def resolve_weights(arch: str, model: ModelConfig) -> Path:
    """``model.pretrained=micro`` (the softcpt_dist.weights entry point in pyproject.toml): the micro CLIP of
    ``arch`` and ``model.micro``."""
    return micro_clip(arch, model.micro)


def scene_batch(seed: int, step: int, batch_size: int, tokenizer, image_size: int = 64):
    """The ``step``-th pre-training batch: uint8 images ``[B, 3, S, S]`` and token ids ``[B, L]``."""
    rng = random.Random(f"{seed}:pretrain:{step}")
    scenes = [sample_scene(rng) for _ in range(batch_size)]
    texts = [caption(s, rng) for s in scenes]
    images = render_batch(scenes, [f"{seed}:pretrain:{step}:{i}" for i in range(batch_size)], image_size)
    return images, tokenizer(texts)


class WorldText(torch.nn.Module):
    """A CLIP's text tower as pre-training runs it: the same function as open_clip's ``encode_text`` at a
    fraction of the cost. Only the token-embedding rows of the world's vocabulary are parameters (no
    caption reaches the others, so they would never change), and each batch is cut after its longest
    caption (attention is causal: later positions never reach the EOT token that gives the feature).
    ``write_back`` puts the trained rows into the model's embedding."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        super().__init__()
        ids = sorted({0, tokenizer.sot_token_id, tokenizer.eot_token_id, *tokenizer.encode(vocabulary())})
        lookup = torch.full((model.token_embedding.num_embeddings,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("ids", torch.tensor(ids), persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)
        self.rows = torch.nn.Parameter(model.token_embedding.weight.detach()[ids].clone())
        self.model = [model]  # not a submodule: its parameters are the model's own
        self.tokenizer, self._word_tokens = tokenizer, {}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model[0]
        eot = tokens.argmax(dim=-1)  # the EOT id is the largest
        length = int(eot.max()) + 1
        compact = self.lookup[tokens[:, :length]]
        if bool((compact < 0).any()):
            raise ValueError("a caption uses a token outside micro.world.vocabulary()")
        x = self.rows[compact] + model.positional_embedding[:length]
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        return x[torch.arange(len(x)), eot] @ model.text_projection

    def tokenize(self, captions: List[str]) -> torch.Tensor:
        """``tokenizer(captions)``, faster: captions are lower-case words and full stops, each word's tokens
        are taken from the tokenizer once and kept."""
        tok, cache = self.tokenizer, self._word_tokens
        out = torch.zeros(len(captions), tok.context_length, dtype=torch.long)
        for i, text in enumerate(captions):
            words = _WORDS.findall(text)
            if "".join(words) != text.replace(" ", ""):
                raise ValueError(f"caption {text!r} is not lower-case words and full stops")
            ids = [tok.sot_token_id]
            for word in words:
                if word not in cache:
                    cache[word] = tok.encode(word)
                ids += cache[word]
            ids = ids[:tok.context_length - 1] + [tok.eot_token_id]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    @torch.no_grad()
    def write_back(self) -> None:
        self.model[0].token_embedding.weight[self.ids] = self.rows


def _param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """open_clip's split: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr(step: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def pretrain(arch: str, cfg: MicroPretrainConfig, out: Path, show_progress: bool = True) -> Path:
    """Pre-train ``arch`` from random init on the micro world; save its state dict to ``out`` (atomic) with
    ``<out>.json`` beside it (settings, loss curve, time)."""
    ensure_builtin_configs()
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(arch, pretrained=None)
    tokenizer = open_clip.get_tokenizer(arch)
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1) * 255
    model.visual.to(memory_format=torch.channels_last)  # faster convolutions on CPU; the same function
    text = WorldText(model, tokenizer)
    model.token_embedding.requires_grad_(False)  # trained through text.rows
    groups = _param_groups(model, cfg.weight_decay)
    groups[1]["params"].append(text.rows)  # an embedding: no weight decay
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, foreach=True)
    model.train()
    curve, start, window = [], time.time(), []
    logger.info("pre-training %s on the micro world: %d steps of %d scenes", arch, cfg.steps, cfg.batch_size)
    bar = progress(range(cfg.steps), desc="pretrain-micro", enabled=show_progress)
    for step in bar:
        images, tokens = scene_batch(cfg.seed, step, cfg.batch_size, text.tokenize, size)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        pixels = ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        image_f = F.normalize(model.encode_image(pixels), dim=-1)
        text_f = F.normalize(text(tokens), dim=-1)
        logits = model.logit_scale.exp() * image_f @ text_f.t()
        target = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        window.append(loss.item())
        if len(window) == cfg.log_every or step + 1 == cfg.steps:
            mean_loss = sum(window) / len(window)
            curve.append({"step": step + 1, "loss": round(mean_loss, 4), "lr": opt.param_groups[0]["lr"]})
            logger.info("pretrain-micro step %d/%d  loss %.4f  logit scale %.1f  %.0f s", step + 1, cfg.steps,
                        mean_loss, model.logit_scale.exp().item(), time.time() - start)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            window = []
    seconds = time.time() - start
    text.write_back()
    model.token_embedding.requires_grad_(True)
    atomic_torch_save({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    atomic_write_text(out.with_suffix(".json"), json.dumps({
        "arch": arch, "world_version": WORLD_VERSION, "settings": asdict(cfg),
        "seconds": round(seconds, 1), "curve": curve}, indent=2))
    logger.info("pre-trained %s in %.0f s: %s", arch, seconds, out)
    return out
