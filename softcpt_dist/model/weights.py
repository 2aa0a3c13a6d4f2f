"""Reading CLIP weights files: open_clip state dicts and OpenAI's original TorchScript archives.

Loading is strict: a file made for another architecture is refused, naming the first mismatch.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

import softcpt_dist  # noqa: F401  (applies the torchvision import shim before open_clip)
import open_clip

# Keys OpenAI's TorchScript archives carry besides the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or does not fit the configured architecture."""


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's original CLIP checkpoints are TorchScript archives (zip files holding code/)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.endswith("constants.pkl") for n in zf.namelist())


def load_state_dict(path: Path) -> tuple[dict, str]:
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


def load_into(model: nn.Module, state: dict, path: Path, arch: str) -> None:
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


def looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or Path(value).suffix in (".pt", ".pth", ".bin", ".safetensors")


def local_weights(pretrained: Optional[str]) -> Tuple[Optional[Path], Optional[dict], Optional[str]]:
    """``(path, state dict, format)`` when ``model.pretrained`` names a local file, else ``(None, None, None)``
    (a pretrained tag, or random init)."""
    if not pretrained or not (looks_like_path(pretrained) or Path(pretrained).exists()):
        return None, None, None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.pretrained: weights file {path} does not exist")
    state, fmt = load_state_dict(path)
    return path, state, fmt
