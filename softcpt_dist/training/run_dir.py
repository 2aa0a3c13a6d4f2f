"""The run folder: resolved config, log file, metrics as JSON lines, results as JSON and Markdown."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

from softcpt_dist.config import Config, to_yaml
from softcpt_dist.files import atomic_write_text

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunDir:
    """Owns ``<output_dir>/<run_name>/``; only the main process writes (``is_main``)."""

    def __init__(self, path: Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self._handler: Optional[logging.Handler] = None
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self._handler = logging.FileHandler(self.path / "train.log")
            self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logging.getLogger().addHandler(self._handler)

    def start_fresh(self) -> None:
        """A reused run name starts over: drop the metrics and evaluations of the previous run."""
        if not self.is_main:
            return
        stale = [self.path / "metrics.jsonl", *self.path.glob("eval_*.json"), *self.path.glob("eval_*.md"),
                 *self.path.glob("memory_*.json"), self.path / "checkpoints"]
        stale = [p for p in stale if p.exists()]
        if stale:
            logging.getLogger(__name__).warning("run folder %s exists: replacing its previous results and "
                                                "training checkpoints (train.resume=latest continues instead)",
                                                self.path)
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def save_config(self, cfg: Config, filename: str = "config.yaml") -> None:
        if self.is_main:
            atomic_write_text(self.path / filename, to_yaml(cfg))

    def log_metrics(self, record: Dict) -> None:
        if self.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(_jsonable({"time": round(time.time(), 3), **record})) + "\n")

    def write_json(self, filename: str, payload: Dict) -> None:
        if self.is_main:
            atomic_write_text(self.path / filename, json.dumps(_jsonable(payload), indent=2) + "\n")

    def write_text(self, filename: str, text: str) -> None:
        if self.is_main:
            atomic_write_text(self.path / filename, text)

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def setup_console_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    # open_clip logs chatty INFO lines on the root logger; keep ours at `level`, others at WARNING.
    root.setLevel(logging.WARNING)
    logging.getLogger("softcpt_dist").setLevel(level)
