"""The frozen CLIP backbone: building it by name with its weights, and its two encoders.

Everything the training loop needs from CLIP is reached through ``forward()`` of a submodule
(``ImageEncoder``, ``TextEncoder``, ``token_embedding``) so that DeepSpeed ZeRO-3, which gathers
partitioned parameters only around ``forward()``, can shard the frozen weights.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

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
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # model.precision's plain choices
OFFICIAL_FP16 = "official_fp16"  # model.precision: the official code's PREC=fp16 (official_amp: an fp32 CLIP)


def ensure_builtin_configs() -> None:
    """Make the project's own open_clip architectures (``model_configs/*.json``: softcpt-micro,
    softcpt-tiny, ...) known to open_clip (idempotent)."""
    names = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
    if not names.issubset(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


# Where a text tower of each open_clip ``pool_type`` reads its feature (the project reads it at the EOT token).
_POOLED_AT = {"last": "the last position", "first": "the first position", "none": "every position",
              "eos": "the first token with id {eos_id}"}


def unsupported_reasons(arch: str) -> List[str]:
    """Why the open_clip architecture ``arch`` cannot be a backbone here, read from its config alone (nothing
    is built, downloaded or imported: a missing ``transformers`` is a reason, never an ImportError); empty
    when it can. Prompts are token embeddings of the CLIP BPE tokenizer fed to open_clip's own CLIP text
    transformer and read at the end-of-text token (docs/real_clip.md lists the families)."""
    model_cfg = open_clip.get_model_config(arch) or {}
    text, vision = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    reasons = []
    coca = "multimodal_cfg" in model_cfg or bool(text.get("embed_cls"))
    if coca:
        reasons.append("a CoCa model (a captioning model whose text tower appends a CLS embedding and pools there)")
    if text.get("hf_model_name"):
        reasons.append(f"a Hugging Face text tower ({text['hf_model_name']}), which needs the `transformers` package "
                       "and the model's config and tokenizer files, and is not open_clip's CLIP text transformer")
    else:
        # open_clip's get_tokenizer: hf_tokenizer_name, else a SigLIP name, means a Hugging Face tokenizer
        if text.get("hf_tokenizer_name") or "siglip" in arch.lower():
            name = text.get("hf_tokenizer_name") or "SigLIP's SentencePiece vocabulary"
            reasons.append(f"a non-CLIP tokenizer ({name}), which needs the `transformers` package and the model's "
                           "tokenizer files (prompts are built from the CLIP BPE tokenizer's tokens)")
        pool = text.get("pool_type", "argmax")
        if pool != "argmax" and not coca:
            where = _POOLED_AT.get(pool, repr(pool)).format(eos_id=text.get("eos_id", 2))
            reasons.append(f"text features pooled at {where} (pool_type={pool!r}), not at the end-of-text token")
    if vision.get("timm_model_name"):
        reasons += _timm_reasons(vision["timm_model_name"])
    return reasons


def _timm_reasons(name: str) -> List[str]:
    if importlib.util.find_spec("timm") is None:
        return [f"a timm image tower ({name}), which needs the `timm` package"]
    import timm
    if not timm.is_model(name):
        return [f"a timm image tower ({name}) that the installed timm {timm.__version__} does not have"]
    return []


def check_architecture(arch: str) -> None:
    """Refuse, by name and reason, an open_clip architecture that cannot be a backbone (``unsupported_reasons``)."""
    reasons = unsupported_reasons(arch)
    if reasons:
        raise ConfigError(f"model.arch={arch!r} is not supported: {'; '.join(reasons)} "
                          "(see docs/real_clip.md for the architectures that work)")


class ImageEncoder(nn.Module):
    """Frozen CLIP image tower; returns raw (unnormalized) image features."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        weight = compute_weight(self.visual)
        return self.visual(images.to(device=weight.device, dtype=weight.dtype))


def compute_weight(module: nn.Module) -> torch.Tensor:
    """The first convolution or linear weight of ``module``: its dtype is the tower's compute dtype, also in
    an OpenAI-style fp16 conversion, which keeps embeddings and layer norms in fp32."""
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.Linear)):
            return sub.weight
    return next(module.parameters())


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
        # model.precision=official_fp16: the methods keep their contexts, and the loss its logits, in fp16
        self.official_fp16 = False
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
    first: ``micro`` pre-trains the micro CLIP of ``cfg.micro`` unless it is cached. An architecture whose
    text side the project cannot prompt (CoCa, SigLIP, Hugging Face text towers, ...) is refused by name and
    reason before anything is built (``check_architecture``)."""
    validate_section(cfg, "model")
    ensure_builtin_configs()
    if cfg.arch not in open_clip.list_models():
        raise ConfigError(f"model.arch={cfg.arch!r} is not an open_clip architecture; "
                          f"e.g. RN50, ViT-B-16, ViT-L-14, softcpt-tiny (see open_clip.list_models())")
    check_architecture(cfg.arch)  # before any weights are resolved, downloaded or read
    resolve = lookup(WEIGHTS, cfg.pretrained) if cfg.pretrained else None
    if resolve is not None:
        # Weights made for the architecture's own activation: an ordinary local weights file from now on.
        cfg = replace(cfg, pretrained=str(resolve(cfg.arch, cfg)), quick_gelu=bool(cfg.quick_gelu))
    pretrained = cfg.pretrained
    path, state, fmt = local_weights(pretrained)
    official = cfg.precision == OFFICIAL_FP16  # converted by open_clip as OpenAI's fp16 CLIP
    kwargs = dict(precision="fp16" if official else "fp32", device="cpu", force_quick_gelu=_quick_gelu(cfg, path, fmt),
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
    if official:
        model = model.to(device=device or cfg.device)
    else:  # official_amp: an fp32 CLIP, autocast by the engine
        model = model.to(device=device or cfg.device, dtype=_DTYPES.get(cfg.precision, torch.float32))
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    text, kernels = text or TextConfig(), kernels or KernelsConfig()
    backbone = CLIPBackbone(model, tokenizer, cfg.arch, pretrained, logit_scale, text.path, text.batch_invariant,
                            kernels.enabled)
    backbone.official_fp16 = official
    return backbone


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
