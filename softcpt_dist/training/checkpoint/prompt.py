"""Prompt checkpoints (``<run>/prompt_checkpoint.pt``): the learnable tensors of every scope plus
the meta they were trained for; they load at any world size and refuse another setup by name."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import torch

from softcpt_dist.files import atomic_torch_save
from softcpt_dist.training.checkpoint.common import CheckpointError, check_meta


def save_prompt_checkpoint(path: Path, meta: Dict, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """``states`` maps a scope ("joint", or a task key for per-task runs) to a learnable state dict."""
    atomic_torch_save({"meta": meta, "states": states}, Path(path))


def load_prompt_checkpoint(path: Path, expected_meta: Dict,
                           transferable: Sequence[str] = ()) -> Dict[str, Dict[str, torch.Tensor]]:
    """The states of a prompt checkpoint made for ``expected_meta`` (see ``check_meta`` for ``transferable``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta, states = payload["meta"], payload["states"]
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if meta.get("format") != expected_meta["format"]:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {expected_meta['format']}")
    check_meta(meta, expected_meta, f"checkpoint {path}", transferable)
    return states


def load_learnable(module: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """Copy a learnable state into ``module``; names and shapes must match exactly."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise CheckpointError(f"{where}: learnable tensors differ: missing {sorted(set(params) - set(state))}, "
                              f"unexpected {sorted(set(state) - set(params))}")
    for name, p in params.items():
        if p.shape != state[name].shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(state[name].shape)}, "
                                  f"expected {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
