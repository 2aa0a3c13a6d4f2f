"""Stop signals (``train.stop_signals``, default SIGUSR1 and SIGTERM: SLURM's warning signal and its
kill) ask a run to save and exit for requeueing.

The handler only records the signal; the training loop checks it at step boundaries (agreed over
all ranks), saves a checkpoint and raises ``Preempted``; the CLI then exits with ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

import signal
from typing import Optional, Sequence

from softcpt_dist.config.signal_names import signal_number

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved, requeue and resume


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint was saved and the job should be requeued."""


class StopSignals:
    """Remembers the first of ``names`` (``train.stop_signals``) that arrives while installed (a context
    manager)."""

    def __init__(self, names: Sequence[str] = ("USR1", "TERM")):
        self.signals = tuple(signal_number(n) for n in names)
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: cannot install handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._previous.items():
            # Leaving on Preempted: the job is exiting with EXIT_PREEMPTED. A late SIGTERM (srun's
            # --kill-on-bad-exit reacts to another rank's exit 75) must not turn that into 143.
            preempted = exc_type is not None and issubclass(exc_type, Preempted)
            signal.signal(sig, signal.SIG_IGN if preempted else handler)
