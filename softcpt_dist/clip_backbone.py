"""The frozen CLIP backbone: building it by name, loading weights, and its two encoders.

Everything the training loop needs from CLIP is reached through ``forward()`` of a submodule
(``ImageEncoder``, ``TextEncoder``, ``token_embedding``) so that DeepSpeed ZeRO-3, which gathers
partitioned parameters only around ``forward()``, can shard the frozen weights.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import softcpt_dist  # noqa: F401  (applies the torchvision import shim before open_clip)
import open_clip

from softcpt_dist.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keys OpenAI's TorchScript archives carry besides the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or does not fit the configured architecture."""


def ensure_builtin_configs() -> None:
    """Make the project's tiny test architectures known to open_clip (idempotent)."""
    names = {p.stem for p in _MODEL_CONFIG_DIR.glob("*.json")}
    if not names.issubset(open_clip.list_models()):
        open_clip.add_model_config(_MODEL_CONFIG_DIR)


def _text_tower(model: nn.Module) -> nn.Module:
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
        tower = _text_tower(model)
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
                 logit_scale: Optional[torch.Tensor] = None):
        super().__init__()
        tower = _text_tower(model)
        self.arch = arch
        self.weights = weights
        self.tokenizer = tokenizer
        for attr in ("sot_token_id", "eot_token_id", "encode"):
            if not hasattr(tokenizer, attr):
                raise ConfigError(f"{arch}: tokenizer {type(tokenizer).__name__} has no {attr!r}; "
                                  "only CLIP BPE tokenizers are supported")
        self.image_encoder = ImageEncoder(model.visual)
        self.text_encoder = TextEncoder(model)
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


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's original CLIP checkpoints are TorchScript archives (zip files holding code/)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.endswith("constants.pkl") for n in zf.namelist())


def _load_state_dict(path: Path) -> tuple[dict, str]:
    """Read a weights file into a state dict; returns it and the detected format."""
    try:
        if _is_torchscript_archive(path):
            archive = torch.jit.load(str(path), map_location="cpu")
            state = {k: v for k, v in archive.state_dict().items() if k not in _OPENAI_EXTRA_KEYS}
            return state, "openai"
        state = open_clip.factory.load_state_dict(str(path), device="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a CLIP state dict")
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state, "open_clip"


def _load_into(model: nn.Module, state: dict, path: Path, arch: str) -> None:
    state = open_clip.factory.convert_state_dict(model, state)
    if "logit_scale" in state and state["logit_scale"].shape != model.logit_scale.shape:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    own = model.state_dict()
    # Archives may carry buffers the model rebuilds itself (e.g. the causal attn_mask).
    rebuilt = {name for name, _ in model.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in rebuilt}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[0]}")
        if missing:
            details.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise WeightsError(f"weights file {path} does not fit model.arch={arch}: " + "; ".join(details))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or Path(value).suffix in (".pt", ".pth", ".bin", ".safetensors")


def build_backbone(cfg: ModelConfig) -> CLIPBackbone:
    """Build the frozen CLIP named by ``cfg.arch`` with weights from a tag, a local file, or none."""
    ensure_builtin_configs()
    if cfg.arch not in open_clip.list_models():
        raise ConfigError(f"model.arch={cfg.arch!r} is not an open_clip architecture; "
                          f"e.g. RN50, ViT-B-16, ViT-L-14, softcpt-tiny (see open_clip.list_models())")
    precision = cfg.precision
    if precision not in _PRECISIONS:
        raise ConfigError(f"model.precision={precision!r} is not one of {list(_PRECISIONS)}")
    pretrained = cfg.pretrained
    path = Path(pretrained).expanduser() if pretrained and (_looks_like_path(pretrained) or Path(pretrained).exists()) else None
    state, fmt = (None, None)
    if path is not None:
        if not path.is_file():
            raise WeightsError(f"model.pretrained: weights file {path} does not exist")
        state, fmt = _load_state_dict(path)
    quick_gelu = cfg.quick_gelu
    if quick_gelu is None:
        # OpenAI's weights were trained with QuickGELU: their archives, and tags such as RN50/openai.
        tag_cfg = open_clip.get_pretrained_cfg(cfg.arch, pretrained) if pretrained and path is None else {}
        quick_gelu = fmt == "openai" or bool(tag_cfg.get("quick_gelu", False))
        arch_default = bool(open_clip.get_model_config(cfg.arch).get("quick_gelu", False))
        if fmt == "open_clip" and not quick_gelu and not arch_default:
            logger.warning("model.quick_gelu is unset: using %s's default activation for %s; set "
                           "model.quick_gelu=true if these are OpenAI-trained weights", cfg.arch, path)
    kwargs = dict(precision="fp32", device="cpu", force_quick_gelu=quick_gelu,
                  nonscalar_logit_scale=True, cache_dir=cfg.cache_dir)
    if pretrained and path is None:
        tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
        if pretrained not in tags:
            raise WeightsError(f"model.pretrained={pretrained!r} is neither a local file nor a pretrained tag "
                               f"of {cfg.arch} (tags: {tags})")
        try:
            model = open_clip.create_model(cfg.arch, pretrained=pretrained, **kwargs)
        except Exception as err:
            raise WeightsError(f"cannot load {cfg.arch} weights {pretrained!r} (offline? set model.pretrained "
                               f"to a local file or model.cache_dir): {err}") from err
    else:
        model = open_clip.create_model(cfg.arch, pretrained=None, **kwargs)
        if state is not None:
            _load_into(model, state, path, cfg.arch)
            logger.info("loaded %s weights (%s format) from %s", cfg.arch, fmt, path)
        else:
            logger.warning("!" * 72)
            logger.warning("model.pretrained is null: %s has RANDOM weights. Results mean nothing "
                           "beyond testing the pipeline.", cfg.arch)
            logger.warning("!" * 72)
    logit_scale = model.logit_scale.detach().float().reshape(()).clone()  # before any low-precision cast
    model = model.to(device=cfg.device, dtype=_PRECISIONS[precision])
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    return CLIPBackbone(model, tokenizer, cfg.arch, pretrained, logit_scale)
