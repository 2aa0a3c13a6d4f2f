"""Signal names as configs write them (``USR1``, ``SIGUSR2``, ``TERM``) and their numbers."""

from __future__ import annotations

import signal


def signal_number(name: str) -> int:
    """The number of a catchable signal named with or without ``SIG``; ValueError names a bad one."""
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    if key in ("SIGKILL", "SIGSTOP") or key not in signal.Signals.__members__:
        raise ValueError(f"{name!r} is not a signal a run can catch (e.g. USR1, USR2, TERM)")
    return int(signal.Signals[key])
