"""The project's own open_clip architectures (``model_configs/*.json``: softcpt-micro, softcpt-tiny, ...)."""

from __future__ import annotations

from pathlib import Path

import softcpt_dist  # noqa: F401  (applies the torchvision import shim before open_clip)
import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def ensure_builtin_configs() -> None:
    """Make the project's architectures known to open_clip (idempotent)."""
    names = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
    if not names.issubset(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
