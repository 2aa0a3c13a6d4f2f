"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary file whose name is unique to this writer (pid and a random token)
in the target's folder, then replaces the target with one rename. Concurrent writers (ranks, other
jobs sharing a folder) therefore never clobber each other's temporary file, and a write killed
midway leaves the previous file in place. A failed write (a full disk above all) is a
``WriteError`` that names the file and says when the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

# Below this many free bytes a failed write is put down to a full disk: torch.save's C++ stream
# reports ENOSPC only as "basic_ios::clear: iostream error" or "PytorchStreamWriter failed writing".
_NEARLY_FULL = 16 * 2**20


class WriteError(OSError):
    """A file could not be written; the message names it (and a full disk)."""


def free_bytes(path: Path) -> int:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def write_error(path: Path, err: BaseException) -> WriteError:
    """A ``WriteError`` for a failed write of ``path``, saying "no space left" when that is the cause."""
    free = free_bytes(path)
    if getattr(err, "errno", None) == errno.ENOSPC or free < _NEARLY_FULL:
        return WriteError(errno.ENOSPC, f"no space left on device writing {path} ({free:,} bytes free): {err}")
    return WriteError(getattr(err, "errno", None) or errno.EIO, f"cannot write {path}: {type(err).__name__}: {err}")


def unique_temp_path(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses (ends in ``.tmp``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temp_path)``, then rename the temporary file onto ``path``; on failure it is removed and
    a ``WriteError`` names ``path``."""
    path = Path(path)
    tmp = unique_temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        raise write_error(path, err) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on ``<path>.lock`` (an flock: released if the holder dies), so that of several
    jobs making the same file, one makes it and the others wait and then find it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
