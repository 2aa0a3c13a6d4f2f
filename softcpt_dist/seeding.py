"""Seeds and random states: one keyed-seed derivation for everything that must not depend on order.

``keyed_seed(*key)`` hashes a key (``seed, epoch, sample``; ``seed, shots, task, class``; ...) into
an integer, so a random choice depends only on what it is about -- not on batch composition,
worker count, rank, restarts or the order files were listed in. The process-wide RNGs are seeded
by ``seed_everything`` and saved/restored with ``rng_state``/``set_rng_state`` for checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Callable, Dict

import numpy as np
import torch


def keyed_seed(*key, bits: int = 63) -> int:
    """The low ``bits`` of the sha256 of ``key`` (its parts joined by ':'), little-endian.

    63 bits suit ``torch.manual_seed``; ``bits=64`` and ``bits=32`` are the whole or the low half of
    the same 8 bytes."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


def keyed_generator(*key) -> torch.Generator:
    """A torch generator seeded by ``keyed_seed(*key)``."""
    return torch.Generator().manual_seed(keyed_seed(*key))


def keyed_random(*key) -> random.Random:
    """A Python RNG seeded by the full 64 bits of ``key``'s hash."""
    return random.Random(keyed_seed(*key, bits=64))


def seeded_call(fn: Callable, *key):
    """``fn()`` with the torch RNG seeded by ``key`` (restored afterwards): random augmentation that
    depends only on the key, not on workers, batch composition, ranks or restarts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(keyed_seed(*key))
        return fn()


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; only effective before CUDA initializes.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Python and numpy RNGs follow the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> Dict:
    """Python, numpy, torch (and CUDA) RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
