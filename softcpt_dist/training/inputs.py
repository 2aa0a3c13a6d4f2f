"""What the model reads per split: samples through the eval transform, or cached image features."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from softcpt_dist import distributed as D
from softcpt_dist.config import DataConfig, TrainConfig
from softcpt_dist.data.dataset import MultiTaskData
from softcpt_dist.data.features import open_cache
from softcpt_dist.data.loaders import make_loader
from softcpt_dist.data.transforms import eval_transform
from softcpt_dist.training.scopes import Scope

logger = logging.getLogger(__name__)


@dataclass
class Inputs:
    data: MultiTaskData
    eval_transform: Callable
    features: Dict[str, torch.Tensor]  # split -> cached features aligned with data.splits[split]
    batch_size: int  # train.eval_batch_size
    seed: int
    num_workers: int

    def loader(self, split: str, scope: Optional[Scope] = None, shard: bool = True):
        """Evaluation loader; with ``shard``, this rank's samples ``rank::world`` only."""
        samples, feats = self.data.splits[split], self.features.get(split)
        if scope is not None:
            samples, feats = scope.select(samples, feats)
        r, w = D.rank(), D.world_size()
        shard = shard and 1 < w <= len(samples)  # every shard non-empty (all ranks decide alike)
        if shard:
            samples, feats = samples[r::w], (None if feats is None else feats[r::w])
        loader = make_loader(samples, self.eval_transform, self.batch_size, self.seed, self.num_workers, feats)
        loader.sharded = shard  # evaluate() gathers the shards' predictions
        return loader


def prepare_inputs(backbone, data: MultiTaskData, splits: Sequence[str], dcfg: DataConfig, train: TrainConfig,
                   precision: str, train_transform_fn: Optional[Callable] = None) -> Inputs:
    """Eval transform, and cached features of ``splits`` when ``data.cache.enabled`` (training
    images get augmented views only with ``data.cache.train_views > 0``; with
    ``data.train_augment=none`` they are plain features)."""
    eval_tf = eval_transform(backbone.preprocess_cfg)
    cache = open_cache(dcfg.cache, backbone, precision, dcfg.num_workers, train.progress)
    features: Dict[str, torch.Tensor] = {}
    if cache is not None:
        for split in splits:
            if split == "train" and train_transform_fn is not None and dcfg.train_augment != "none":
                if dcfg.cache.train_views > 0:
                    features[split] = cache.features(data.splits[split], train_transform_fn, dcfg.cache.train_views,
                                                     train.seed, dcfg.train_augment)
                continue  # no cached views: augment images on the fly
            features[split] = cache.features(data.splits[split], eval_tf)
        logger.info("feature cache %s: %s", cache.dir, ", ".join(f"{k} {tuple(v.shape)}" for k, v in features.items()))
    return Inputs(data, eval_tf, features, train.eval_batch_size, train.seed, dcfg.num_workers)
