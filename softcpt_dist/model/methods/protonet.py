"""ProtoNet on frozen image features: the nearest class prototype, per task.

Each image feature is L2-normalised; a class's prototype is the mean of its normalised training features
(Snell et al., 2017, with CLIP's image tower as the fixed embedding); an image is given the class whose
prototype is nearest in squared Euclidean distance, among its own task's classes. Nothing is trained and
nothing is chosen on the validation split.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from softcpt_dist.config import MethodConfig
from softcpt_dist.data.tasks import DataError, TaskGroup
from softcpt_dist.metrics import group_metrics
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.methods.linear_probe import extract_features


def prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, D]``: the mean of each class's L2-normalised features."""
    x = F.normalize(features.double(), dim=-1)
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        raise DataError(f"ProtoNet: class(es) {torch.nonzero(counts == 0).flatten().tolist()} have no training image")
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    return sums / counts.unsqueeze(1)


def nearest_prototype(features: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Index of the prototype nearest (squared Euclidean) to each L2-normalised feature."""
    return torch.cdist(F.normalize(features.double(), dim=-1), protos).argmin(dim=1)


class ProtoNet(Method):
    """No prompts: ``fit`` builds each task's class prototypes from the training split and scores."""

    name = "protonet"
    trains_prompts = False
    fits = True
    splits = ("train",)

    @classmethod
    def fit(cls, backbone, group: TaskGroup, loaders: Dict[str, DataLoader], cfg: MethodConfig,
            eval_split: str) -> Tuple[Dict, Dict]:
        feats = {split: extract_features(backbone, loader) for split, loader in loaders.items()}
        (xt, tt, yt), (xe, te, ye) = feats["train"], feats[eval_split]
        preds = torch.empty_like(ye)
        for i, task in enumerate(group.tasks):
            protos = prototypes(xt[tt == i], yt[tt == i], task.num_classes)
            preds[te == i] = nearest_prototype(xe[te == i], protos)
        return group_metrics(group, te, ye, preds), {}
