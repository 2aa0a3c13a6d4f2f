"""The run folder: resolved config, log file, metrics as JSON lines, results as JSON and Markdown."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

from softcpt_dist.config import Config, to_yaml
from softcpt_dist import distributed as D
from softcpt_dist.files import atomic_write_text, write_error
from softcpt_dist.training.run_lock import RunFolderBusy, RunLock
from softcpt_dist.training import tensorboard_mirror as tensorboard

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class LogBuffer(logging.Handler):
    """Holds the log records of a run's first moments (weights, data) until its folder opens."""

    def __init__(self):
        super().__init__()
        self.records = []
        logging.getLogger().addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        super().close()


class RunDir:
    """Owns ``<output_dir>/<run_name>/``; only the main process writes (``is_main``).

    Nothing is touched before ``open``, which the experiment calls once the config, weights and data
    have been checked: a run that fails on bad input leaves an existing folder as it was."""

    def __init__(self, path: Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self._handler: Optional[logging.Handler] = None
        self._lock: Optional[RunLock] = None
        self._tensorboard = None  # TensorBoardMirror once the first record is logged, if tensorboard is installed

    def open(self, fresh: bool, lock: bool = True, replay: Optional[LogBuffer] = None) -> None:
        """Take the run folder (``lock``: exclusively), start the log file, replay ``replay``'s records.

        ``fresh``: a run starting anew under an existing name moves the old folder aside (never
        deleting anything) to ``<name>.replaced-<time>``; resuming continues in it. All ranks call it."""
        error = None
        if self.is_main:
            try:
                self._take(fresh, lock)
            except (RunFolderBusy, OSError) as err:
                error = err
        if D.any_rank(error is not None):
            raise error or RunFolderBusy(f"rank 0 could not take the run folder {self.path}")
        if self._handler is not None:
            for record in replay.records if replay is not None else ():
                self._handler.handle(record)
            logging.getLogger().addHandler(self._handler)
        if replay is not None:
            replay.close()

    def _take(self, fresh: bool, lock: bool) -> None:
        if lock:
            self._lock = RunLock(self.path)
            self._lock.acquire()
        if fresh and self.path.is_dir() and any(self.path.iterdir()):
            aside = _aside_name(self.path)
            self.path.rename(aside)
            logging.getLogger(__name__).warning("run folder %s existed: moved it to %s (train.resume=latest "
                                                "continues a run instead)", self.path, aside)
        self.path.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.path / "train.log")
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))

    def cut_metrics(self, scope: str, step: int) -> None:
        """Drop ``scope``'s records after ``step`` (a resumed run repeats them) so that metrics.jsonl
        reads as if the run had never stopped."""
        path = self.path / "metrics.jsonl"
        if not self.is_main or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not _after(line, scope, step)]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))

    def save_config(self, cfg: Config, filename: str = "config.yaml") -> None:
        if self.is_main:
            atomic_write_text(self.path / filename, to_yaml(cfg))

    def log_metrics(self, record: Dict) -> None:
        if self.is_main:
            path = self.path / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(_jsonable({"time": round(time.time(), 3), **record})) + "\n")
            except OSError as err:
                raise write_error(path, err) from err
            if self._tensorboard is None and tensorboard.available():
                self._tensorboard = tensorboard.TensorBoardMirror(self.path / "tensorboard")
            if self._tensorboard is not None:
                self._tensorboard.write(_jsonable(record))

    def write_json(self, filename: str, payload: Dict) -> None:
        if self.is_main:
            atomic_write_text(self.path / filename, json.dumps(_jsonable(payload), indent=2) + "\n")

    def write_text(self, filename: str, text: str) -> None:
        if self.is_main:
            atomic_write_text(self.path / filename, text)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{path.name}.replaced-{stamp}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.replaced-{stamp}-{n}"), n + 1
    return aside


def _after(line: str, scope: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True  # a line cut off by a kill
    return record.get("scope") == scope and record.get("step", 0) > step


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
