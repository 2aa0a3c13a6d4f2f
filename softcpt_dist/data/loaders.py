"""DataLoaders over samples: evaluation in sample order, training driven by the task-balanced sampler.

Either side reads images through a transform or, with the feature cache, rows of cached image
features (then without worker processes: the features are in memory and workers would only add IPC).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from softcpt_dist.config import SamplerConfig
from softcpt_dist.data.dataset import MultiTaskImageDataset, Sample
from softcpt_dist.data.features import CachedFeatureDataset
from softcpt_dist.data.sampler import TaskBalancedBatchSampler
from softcpt_dist.seeding import seed_worker


def make_loader(samples: List[Sample], transform, batch_size: int, seed: int, num_workers: int = 0,
                features: Optional[torch.Tensor] = None) -> DataLoader:
    """Evaluation loader in sample order: images through ``transform``, or cached ``features``."""
    dataset = (CachedFeatureDataset(samples, features) if features is not None
               else MultiTaskImageDataset(samples, transform))
    num_workers = 0 if features is not None else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=seed_worker if num_workers else None)


def make_train_loader(samples: List[Sample], transform, batch_size: int, *, seed: int, sampler: SamplerConfig,
                      num_workers: int = 0, features: Optional[torch.Tensor] = None, rank: int = 0,
                      world_size: int = 1) -> Tuple[DataLoader, TaskBalancedBatchSampler]:
    """Training loader of this rank's shard of each epoch; ``batch_size`` is this rank's micro-batch.

    Augmentation (and the choice of a cached view) is seeded per (seed, epoch, sample): call the
    dataset's ``set_epoch`` with the sampler's."""
    dataset = (CachedFeatureDataset(samples, features, seed) if features is not None
               else MultiTaskImageDataset(samples, transform, seed=seed))
    batches = TaskBalancedBatchSampler([s.task for s in samples], batch_size, seed=seed, mode=sampler.mode,
                                       temperature=sampler.temperature, tasks_per_batch=sampler.tasks_per_batch,
                                       world_size=world_size, rank=rank)
    workers = 0 if features is not None else num_workers
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                        worker_init_fn=seed_worker if workers else None)
    return loader, batches
