"""TensorBoard event files beside metrics.jsonl, when the ``tensorboard`` package is installed
(``pip install 'softcpt_dist[tensorboard]'``). metrics.jsonl stays the source of truth: this is a
mirror for viewing, written by the main process only."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger(__name__)

_INDEX = {"step": "step", "epoch": "epoch"}  # the record field each kind of record is plotted against


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardMirror:
    """Scalars of every metrics record: tag ``<scope>/<kind>/<field>`` (e.g. ``joint/epoch/loss``) against
    the record's step (step records) or epoch (epoch records); per-rank lists are written per rank."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self._writer: Optional[SummaryWriter] = SummaryWriter(log_dir=str(folder))

    def write(self, record: Dict) -> None:
        if self._writer is None:
            return
        kind, scope = record.get("kind", "record"), record.get("scope", "run")
        index = record.get(_INDEX.get(kind, "step"), record.get("step", 0))
        for key, value in record.items():
            if key in ("kind", "scope", "time", "step", "epoch"):
                continue
            if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
                for rank, v in enumerate(value):
                    self._writer.add_scalar(f"{scope}/{kind}/{key}/rank{rank}", float(v), index)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{scope}/{kind}/{key}", float(value), index)
        if kind == "epoch":
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
