"""Named providers that packages on top of the library supply: a dataset (``data.dataset=<name>``) or a
weights resolver (``model.pretrained=<name>``). Config, data and model look names up here and import
none of those packages; the micro world (``softcpt_dist.micro``) is one such provider.

A provider is registered in-process with ``register``, or declared as a Python entry point in one of
the groups below and loaded on the first lookup of its name::

    [project.entry-points."softcpt_dist.datasets"]
    my_group = "my_package.data:DATASET"
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Dict, List, Optional

DATASETS = "softcpt_dist.datasets"  # softcpt_dist.data.loading.GeneratedDataset
WEIGHTS = "softcpt_dist.weights"  # callable(arch: str, model: ModelConfig) -> Path of a local weights file

_registered: Dict[str, Dict[str, Any]] = {DATASETS: {}, WEIGHTS: {}}


def _group(group: str) -> Dict[str, Any]:
    if group not in _registered:
        raise ValueError(f"unknown provider group {group!r}; known: {sorted(_registered)}")
    return _registered[group]


def register(group: str, name: str, provider: Any) -> None:
    """Make ``provider`` the one named ``name`` in ``group`` for this process (it replaces an entry point's)."""
    _group(group)[name] = provider


def lookup(group: str, name: str) -> Optional[Any]:
    """The provider named ``name`` in ``group``, or None: registered ones first, then entry points."""
    found = _group(group)
    if name not in found:
        points = [p for p in entry_points(group=group) if p.name == name]
        if not points:
            return None
        found[name] = points[0].load()
    return found[name]


def names(group: str) -> List[str]:
    """Every provider name ``group`` knows: registered and declared."""
    return sorted(set(_group(group)) | {p.name for p in entry_points(group=group)})
