"""Frozen image-feature cache: the image encoder never trains, so encode each image once.

Layout::

    <cache.dir>/<model key>/meta.json            what the key stands for (arch, weights, preprocessing)
    <cache.dir>/<model key>/<set key>.pt         {"paths": [...], "features": [N, D] or [N, V, D]}

The model key hashes the architecture, a fingerprint of the image tower's actual weights (so
random-init, local and tagged weights can never be confused), its precision and the preprocessing.
The set key hashes the sorted image paths with each file's size and modification time (an image
replaced in place makes a new entry) and, for training views, the number of views, the augmentation
and its seed. Evaluation splits are therefore shared by every run of the same model;
training views by runs with the same few-shot subset. Ranks encode disjoint slices and rank 0
merges them; files are written atomically under job-unique temporary names, and a file lock makes a
second job wait for an entry that another job is encoding instead of encoding it too.

Augmented view ``v`` of an image is made with the torch RNG seeded by (seed, path, v), so the views
do not depend on batch size, worker count or rank.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from softcpt_dist import distributed as D
from softcpt_dist.config import FeatureCacheConfig
from softcpt_dist.data.dataset import Sample, load_image
from softcpt_dist.files import atomic_torch_save, atomic_write_text
from softcpt_dist.progress import progress
from softcpt_dist.seeding import keyed_seed, seeded_call

logger = logging.getLogger(__name__)


def _sha(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes, bytes) of ``module``."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Views(Dataset):
    """Item ``i * views + v``: view ``v`` of image ``i`` (``views=0``: the plain transform, no seeding)."""

    def __init__(self, paths: Sequence[str], transform: Callable, views: int, seed: int):
        self.paths, self.transform, self.views, self.seed = list(paths), transform, views, seed

    def __len__(self) -> int:
        return len(self.paths) * max(self.views, 1)

    def __getitem__(self, item: int):
        i, v = divmod(item, max(self.views, 1))
        img = load_image(self.paths[i])
        if self.views == 0:
            return self.transform(img)
        return seeded_call(lambda: self.transform(img), self.seed, self.paths[i], v)


class FeatureCache:
    def __init__(self, root: str | Path, backbone, precision: str, batch_size: int = 128, num_workers: int = 0,
                 show_progress: bool = False):
        self.backbone, self.batch_size, self.num_workers = backbone, batch_size, num_workers
        self.show_progress = show_progress
        self.rank, self.world_size = D.rank(), D.world_size()
        fingerprint = weights_fingerprint(backbone.image_encoder)
        self.identity = {"arch": backbone.arch, "weights": backbone.weights, "weights_sha256": fingerprint,
                         "precision": precision, "preprocess": backbone.preprocess_cfg}
        self.dir = Path(root) / _sha(json.dumps(self.identity, sort_keys=True, default=str))[:20]
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "meta.json"
            if not meta.is_file():
                atomic_write_text(meta, json.dumps(self.identity, indent=2, sort_keys=True, default=str))
        D.barrier()
        self._lock = None

    def features(self, samples: List[Sample], transform: Callable, views: int = 0, seed: int = 0,
                 augment: str = "") -> torch.Tensor:
        """Features aligned with ``samples``: ``[N, D]`` (``views=0``) or ``[N, V, D]``; encoded on a miss."""
        paths = sorted({s.path for s in samples})
        path = self.dir / f"{_set_key(paths, views, seed, augment)}.pt"
        if self._claim(path):
            try:
                self._encode_and_store(path, paths, transform, views, seed)
            finally:
                self._release()
        # mmap: rows are read on demand, the entry is not copied into every rank's memory.
        entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if entry["paths"] != paths:
            raise RuntimeError(f"feature cache entry {path} does not match its key; delete it")
        row = {p: i for i, p in enumerate(entry["paths"])}
        return entry["features"][torch.as_tensor([row[s.path] for s in samples], dtype=torch.long)]

    def _claim(self, path: Path) -> bool:
        """Whether this job must encode ``path``: rank 0 waits for any other job encoding the same entry
        (file lock), then decides, and tells the other ranks. The lock is held until ``_release``."""
        decision = [False, ""]
        if self.rank == 0:
            self._lock = open(path.with_suffix(".lock"), "w")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            decision = [not path.is_file(), uuid.uuid4().hex[:12]]
            if not decision[0]:
                self._release()
        decision = D.broadcast_object(decision)
        self._token = decision[1]  # names this job's part and temp files
        return decision[0]

    def _release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
            self._lock = None

    @torch.no_grad()
    def _encode_and_store(self, path: Path, paths: List[str], transform, views: int, seed: int) -> None:
        per_image = max(views, 1)
        n_items = len(paths) * per_image
        mine = list(range(self.rank, n_items, self.world_size))  # this rank's disjoint slice
        loader = DataLoader(torch.utils.data.Subset(_Views(paths, transform, views, seed), mine),
                            batch_size=self.batch_size, num_workers=self.num_workers)
        chunks = []
        desc = f"caching {'train views' if views else 'features'} ({len(paths)} images)"
        for images in progress(loader, desc=desc, enabled=self.show_progress and self.rank == 0):
            chunks.append(self.backbone.image_encoder(images).float().cpu())
        local = torch.cat(chunks) if chunks else torch.empty(0)
        part = lambda r: path.with_name(f"{path.stem}.{self._token}.part{r}")  # noqa: E731
        if self.world_size > 1:
            torch.save(local, part(self.rank))
            D.barrier()
        if self.rank == 0:
            if self.world_size > 1:
                merged = None
                for r in range(self.world_size):
                    rows = torch.load(part(r), weights_only=True)
                    if merged is None:
                        merged = torch.empty(n_items, rows.shape[1])
                    merged[r::self.world_size] = rows  # rank r encoded items r, r + W, ...
                    part(r).unlink()
                local = merged
            features = local.view(len(paths), views, -1) if views else local
            atomic_torch_save({"paths": paths, "features": features}, path)
            logger.info("cached %d feature rows in %s", features.shape[0], path)
        D.barrier()


def _set_key(paths: List[str], views: int, seed: int, augment: str) -> str:
    """Hash of the images (path, size, modification time: an image replaced in place is a new entry)
    and, for training views, the views, their seed and the augmentation."""
    h = hashlib.sha256(f"views={views}:{seed if views else ''}:{augment if views else ''}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"\x1f{p}\x1e{st.st_size}\x1e{st.st_mtime_ns}".encode())
        except FileNotFoundError:
            h.update(f"\x1f{p}\x1emissing".encode())  # encoding will then name the missing file
    return h.hexdigest()[:24]


class CachedFeatureDataset(Dataset):
    """Items ``(feature, task, label, index)`` from cached features; with views, epoch ``e`` picks for
    sample ``i`` the view ``hash(seed, e, i) mod V`` (call ``set_epoch``)."""

    def __init__(self, samples: List[Sample], features: torch.Tensor, seed: int = 0):
        self.samples, self.features, self.seed, self.epoch = samples, features, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s, f = self.samples[i], self.features[i]
        if f.dim() == 2:
            f = f[keyed_seed(self.seed, self.epoch, i, bits=32) % f.shape[0]]
        return f, s.task, s.label, i


def open_cache(cfg: FeatureCacheConfig, backbone, precision: str, num_workers: int = 0,
               show_progress: bool = False) -> Optional[FeatureCache]:
    """The run's feature cache (``data.cache``), or None when it is not enabled."""
    if not cfg.enabled:
        return None
    return FeatureCache(Path(cfg.dir).expanduser(), backbone, precision, cfg.batch_size, num_workers, show_progress)
