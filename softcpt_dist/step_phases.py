"""Where a training step's time goes: exclusive wall time per named phase, and timed collectives.

A phase's time excludes the phases nested in it, so the communication inside the text forward (the
class features' all-gather) or inside backward (their gradients, DeepSpeed's gradient all-reduce) is
counted once, as communication. Every phase boundary synchronizes the device, so a CUDA phase is
timed to its last kernel (at the price of the overlap it would otherwise have); an asynchronous
collective (``async_op=True``) is counted while it is issued, its wait where the waiting phase is.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist

# torch.distributed's collectives, looked up on the package at call time by our code and DeepSpeed's
# torch backend (which also keeps two of them as attributes: engine.engine_collective_slots()).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "all_to_all_single",
               "all_to_all", "barrier", "all_reduce_coalesced")


class NullTimer:
    """The timer of an unprofiled run: every phase a no-op."""

    def __call__(self, name: str):
        return contextlib.nullcontext()


NULL_TIMER = NullTimer()


class PhaseTimer:
    """``with timer("text_forward"): ...`` inside ``begin_step()`` .. ``end_step()``; ``steps`` holds one
    ``{phase: seconds, "step": seconds}`` record per step. Phases outside a step are not timed."""

    def __init__(self, device: torch.device):
        cuda = torch.device(device).type == "cuda"
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.steps: List[Dict[str, float]] = []
        self._current = None
        self._children: List[float] = []  # time of the phases nested in each open phase

    def begin_step(self) -> None:
        self._sync()
        self._current, self._start = defaultdict(float), time.perf_counter()

    def end_step(self) -> Dict[str, float]:
        self._sync()
        record = dict(self._current)
        record["step"] = time.perf_counter() - self._start
        self.steps.append(record)
        self._current = None
        return record

    @contextlib.contextmanager
    def _timed(self, name: str):
        self._sync()
        start = time.perf_counter()
        self._children.append(0.0)
        try:
            with torch.profiler.record_function(name):  # the phase, as a range in a --trace file
                yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            nested = self._children.pop()
            self._current[name] += elapsed - nested
            if self._children:
                self._children[-1] += elapsed

    def __call__(self, name: str):
        return self._timed(name) if self._current is not None else contextlib.nullcontext()


@contextlib.contextmanager
def timed_collectives(timer, extra_slots: Iterable[Tuple[object, str]] = ()):
    """Count every collective called inside as the phase ``communication``: torch.distributed's functions
    and the ``(object, attribute)`` slots in ``extra_slots`` are wrapped, and restored on exit."""
    slots = [(dist, name) for name in COLLECTIVES if hasattr(dist, name)] + list(extra_slots)
    saved = [(owner, name, getattr(owner, name)) for owner, name in slots]

    def wrap(fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with timer("communication"):
                return fn(*args, **kwargs)
        return timed

    try:
        for owner, name, fn in saved:
            setattr(owner, name, wrap(fn))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
