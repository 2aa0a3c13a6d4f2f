"""An exclusive lock on a run folder: one live run per run name.

The lock is ``<output_dir>/.<run name>.lock`` (beside the folder, which a fresh run may move
aside), held with ``flock`` for the life of the process: the kernel releases it when the process
dies, however it dies, so a lock left by a dead run never blocks the next one. The file records
the holder's host, pid and start time, which a refused run names.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)


class RunFolderBusy(RuntimeError):
    """Another live run holds the run folder."""


def lock_path(run_folder: Path) -> Path:
    run_folder = Path(run_folder)
    return run_folder.parent / f".{run_folder.name}.lock"


class RunLock:
    def __init__(self, run_folder: Path):
        self.run_folder, self.path = Path(run_folder), lock_path(run_folder)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise RunFolderBusy(f"run folder {self.run_folder} is in use by another live run ({holder}); "
                                    "wait for it, or choose another train.run_name") from None
            # The holder before us may have removed the file after we opened it: lock the current file.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        previous = self._holder(fd)
        if previous != "unknown holder":
            logger.info("run folder lock %s: the previous holder (%s) is gone", self.path, previous)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (ValueError, KeyError, OSError):
            return "unknown holder"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiting run then locks a fresh file
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
