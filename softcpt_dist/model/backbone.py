"""The frozen CLIP backbone: building it by name with its weights, and its two encoders.

Everything the training loop needs from CLIP is reached through ``forward()`` of a submodule
(``ImageEncoder``, ``TextEncoder``, ``token_embedding``) so that DeepSpeed ZeRO-3, which gathers
partitioned parameters only around ``forward()``, can shard the frozen weights.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import softcpt_dist  # noqa: F401  (applies the torchvision import shim before open_clip)
import open_clip

from softcpt_dist.config import ConfigError, KernelsConfig, ModelConfig, TextConfig, validate_section
from softcpt_dist.model.image_tokens import local_image_features
from softcpt_dist.model.text_encoder import TextEncoder, text_tower
from softcpt_dist.model.weights import WeightsError, load_into, local_weights
from softcpt_dist.plugins import WEIGHTS, lookup

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # model.precision's choices


def ensure_builtin_configs() -> None:
    """Make the project's own open_clip architectures (``model_configs/*.json``: softcpt-micro,
    softcpt-tiny, ...) known to open_clip (idempotent)."""
    names = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
    if not names.issubset(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


class ImageEncoder(nn.Module):
    """Frozen CLIP image tower; returns raw (unnormalized) image features."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.visual.parameters())
        return self.visual(images.to(device=param.device, dtype=param.dtype))


class CLIPBackbone(nn.Module):
    """Frozen CLIP in eval mode: image encoder, text encoder, token embedding, tokenizer, logit scale."""

    def __init__(self, model: nn.Module, tokenizer, arch: str, weights: Optional[str],
                 logit_scale: Optional[torch.Tensor] = None, text_path: str = "shared_prefix",
                 batch_invariant: bool = True, kernels: str = "auto"):
        super().__init__()
        tower = text_tower(model)
        self.arch = arch
        self.weights = weights
        self.tokenizer = tokenizer
        for attr in ("sot_token_id", "eot_token_id", "encode"):
            if not hasattr(tokenizer, attr):
                raise ConfigError(f"{arch}: tokenizer {type(tokenizer).__name__} has no {attr!r}; "
                                  "only CLIP BPE tokenizers are supported")
        self.image_encoder = ImageEncoder(model.visual)
        # [B, 1 + M, E] per-position image features (PLOT); None for towers without them (image_tokens.py)
        self.image_tokens = local_image_features(model.visual)
        self.text_encoder = TextEncoder(model, text_path, batch_invariant, kernels)
        self.token_embedding = tower.token_embedding
        # logit_scale is kept as a plain buffer: it is frozen, and DeepSpeed rejects 0-dim parameters.
        if logit_scale is None:
            logit_scale = model.logit_scale.detach().float().reshape(()).clone()
        self.register_buffer("logit_scale", logit_scale.to(model.logit_scale.device))
        self.preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Frozen means frozen: BatchNorm/dropout of the towers never leave eval mode.
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return self.text_encoder.output_dim

    @property
    def ctx_dim(self) -> int:
        return self.text_encoder.width

    @property
    def context_length(self) -> int:
        return self.text_encoder.context_length

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the text transformer's blocks in backward (exact: the same gradients, less memory)."""
        self.text_encoder.grad_checkpointing = enabled


def build_backbone(cfg: ModelConfig, device: Optional[str] = None, text: Optional[TextConfig] = None,
                   kernels: Optional[KernelsConfig] = None) -> CLIPBackbone:
    """The frozen CLIP named by ``cfg.arch`` with weights from a tag, a local file, or none, on
    ``device`` (default ``cfg.device``); ``text`` chooses the text encoding path (default shared prefix),
    ``kernels`` whether its attention and input assembly use the Triton kernels (default auto).
    A ``pretrained`` name with a registered weights resolver (``softcpt_dist.plugins.WEIGHTS``) is resolved
    first: ``micro`` pre-trains the micro CLIP of ``cfg.micro`` unless it is cached."""
    validate_section(cfg, "model")
    ensure_builtin_configs()
    if cfg.arch not in open_clip.list_models():
        raise ConfigError(f"model.arch={cfg.arch!r} is not an open_clip architecture; "
                          f"e.g. RN50, ViT-B-16, ViT-L-14, softcpt-tiny (see open_clip.list_models())")
    resolve = lookup(WEIGHTS, cfg.pretrained) if cfg.pretrained else None
    if resolve is not None:
        # Weights made for the architecture's own activation: an ordinary local weights file from now on.
        cfg = replace(cfg, pretrained=str(resolve(cfg.arch, cfg)), quick_gelu=bool(cfg.quick_gelu))
    pretrained = cfg.pretrained
    path, state, fmt = local_weights(pretrained)
    kwargs = dict(precision="fp32", device="cpu", force_quick_gelu=_quick_gelu(cfg, path, fmt),
                  nonscalar_logit_scale=True, cache_dir=cfg.cache_dir)
    if pretrained and path is None:
        model = _create_tagged(cfg.arch, pretrained, kwargs)
    else:
        model = open_clip.create_model(cfg.arch, pretrained=None, **kwargs)
        if state is not None:
            load_into(model, state, path, cfg.arch)
            logger.info("loaded %s weights (%s format) from %s", cfg.arch, fmt, path)
        else:
            logger.warning("!" * 72)
            logger.warning("model.pretrained is null: %s has RANDOM weights. Results mean nothing "
                           "beyond testing the pipeline.", cfg.arch)
            logger.warning("!" * 72)
    logit_scale = model.logit_scale.detach().float().reshape(()).clone()  # before any low-precision cast
    model = model.to(device=device or cfg.device, dtype=_DTYPES[cfg.precision])
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    text, kernels = text or TextConfig(), kernels or KernelsConfig()
    return CLIPBackbone(model, tokenizer, cfg.arch, pretrained, logit_scale, text.path, text.batch_invariant,
                        kernels.enabled)


def _quick_gelu(cfg: ModelConfig, path: Optional[Path], fmt: Optional[str]) -> bool:
    """``model.quick_gelu``, or when unset: on for OpenAI's weights (their archives, and tags such as
    RN50/openai, were trained with QuickGELU), else the architecture's default."""
    if cfg.quick_gelu is not None:
        return cfg.quick_gelu
    tag_cfg = open_clip.get_pretrained_cfg(cfg.arch, cfg.pretrained) if cfg.pretrained and path is None else {}
    quick_gelu = fmt == "openai" or bool(tag_cfg.get("quick_gelu", False))
    arch_default = bool(open_clip.get_model_config(cfg.arch).get("quick_gelu", False))
    if fmt == "open_clip" and not quick_gelu and not arch_default:
        logger.warning("model.quick_gelu is unset: using %s's default activation for %s; set "
                       "model.quick_gelu=true if these are OpenAI-trained weights", cfg.arch, path)
    return quick_gelu


def _create_tagged(arch: str, tag: str, kwargs: dict) -> nn.Module:
    """An open_clip model with the weights of a pretrained tag (downloaded, or from ``cache_dir``)."""
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise WeightsError(f"model.pretrained={tag!r} is neither a local file nor a pretrained tag "
                           f"of {arch} (tags: {tags})")
    try:
        return open_clip.create_model(arch, pretrained=tag, **kwargs)
    except Exception as err:
        raise WeightsError(f"cannot load {arch} weights {tag!r} (offline? set model.pretrained "
                           f"to a local file or model.cache_dir): {err}") from err
