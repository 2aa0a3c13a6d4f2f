"""Image transforms: the model's own preprocessing for evaluation, the paper's augmentation for training."""

from __future__ import annotations

import softcpt_dist  # noqa: F401  (torchvision import shim)
from open_clip.transform import PreprocessCfg, image_transform_v2
from torchvision import transforms as T


def eval_transform(preprocess_cfg: dict):
    """open_clip's evaluation preprocessing of the loaded model (resize, center crop, normalize)."""
    return image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)


def train_transform(preprocess_cfg: dict, augment: str = "paper"):
    """Paper/CoOp augmentation: random resized crop (scale 0.08-1, bicubic) + horizontal flip."""
    if augment == "none":
        return eval_transform(preprocess_cfg)
    size = preprocess_cfg["size"]
    size = size if isinstance(size, int) else tuple(size)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=preprocess_cfg["mean"], std=preprocess_cfg["std"]),
    ])
