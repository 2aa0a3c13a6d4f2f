"""Deterministic K-shot subsets: K images per class of every task, a pure function of (seed, K)."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from typing import Dict, List, Tuple

from softcpt_dist.data.dataset import Sample


def fewshot_subset(samples: List[Sample], shots: int, seed: int) -> Tuple[List[Sample], Dict[Tuple[int, int], int]]:
    """Pick ``shots`` samples per (task, class); returns the subset and the classes that had fewer.

    Each class draws from its own RNG seeded by (seed, shots, task, class), so the choice for one
    class does not depend on the other classes or on the order samples were listed in.
    """
    if shots <= 0:
        return list(samples), {}
    by_class: Dict[Tuple[int, int], List[Sample]] = defaultdict(list)
    for s in samples:
        by_class[(s.task, s.label)].append(s)
    chosen, short = [], {}
    for key in sorted(by_class):
        pool = sorted(by_class[key], key=lambda s: s.path)
        digest = hashlib.sha256(f"{seed}:{shots}:{key[0]}:{key[1]}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        if len(pool) < shots:
            short[key] = len(pool)
            chosen.extend(pool)
        else:
            chosen.extend(rng.sample(pool, shots))
    return chosen, short
