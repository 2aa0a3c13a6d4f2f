"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary file whose name is unique to this writer (pid and a random token)
in the target's folder, then replaces the target with one rename. Concurrent writers (ranks, other
jobs sharing a folder) therefore never clobber each other's temporary file, and a write killed
midway leaves the previous file in place.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch


def unique_temp_path(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses (ends in ``.tmp``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temp_path)``, then rename the temporary file onto ``path``; on failure it is removed."""
    path = Path(path)
    tmp = unique_temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
