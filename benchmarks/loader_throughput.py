"""Training input throughput (images/s) with and without the frozen image-feature cache.

Measured side by side in one run, on generated JPEGs of a realistic size:

- ``images: loader only``    -- decode + the paper's augmentation (no encoder), the CPU side;
- ``images: loader+encoder`` -- what a training step needs from the image side without the cache;
- ``cache: features``        -- cached augmented views read from the cache (what training reads with it);
- ``cache: build``           -- one-off cost of encoding the views into the cache.

The ratio ``cache / loader+encoder`` is the speed-up of the image side of a training step.

    python benchmarks/loader_throughput.py                       # tiny CLIP, CPU, ~1 min
    python benchmarks/loader_throughput.py --arch ViT-L-14 --device cuda --num-workers 8 --images-per-class 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import softcpt_dist  # noqa: F401  (torchvision shim before open_clip)
import torch

from softcpt_dist.config import ModelConfig, SyntheticDataConfig, load_config
from softcpt_dist.data import generate_synthetic, read_task_folders
from softcpt_dist.data.features import FeatureCache
from softcpt_dist.data.loaders import make_train_loader
from softcpt_dist.data.transforms import train_transform
from softcpt_dist.model import build_backbone, encode_images


def _timed_epoch(loader, sampler, epoch, consume) -> float:
    """Images per second over one epoch of the loader (``consume`` does the per-batch work)."""
    sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    n, t0 = 0, time.perf_counter()
    for inputs, *_ in loader:
        consume(inputs)
        n += inputs.shape[0]
    _sync()
    return n / (time.perf_counter() - t0)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(name, loader, sampler, consume, repeats, rows):
    _timed_epoch(loader, sampler, 0, consume)  # warm-up: worker start, allocator, file cache
    rates = [_timed_epoch(loader, sampler, e + 1, consume) for e in range(repeats)]
    med = statistics.median(rates)
    rows.append((name, med, min(rates), max(rates)))
    return med


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="softcpt-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--images-per-class", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--views", type=int, default=4, help="augmented views per image in the cache")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per measurement (median reported)")
    p.add_argument("--workdir", type=Path, default=None, help="where data and cache go (default: a temp dir)")
    args = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    root = work / "data"
    if not (root / "tasks.json").is_file():
        generate_synthetic(root, SyntheticDataConfig(train_per_class=args.images_per_class, val_per_class=1,
                                                     test_per_class=1, image_size=args.image_size))
    samples = read_task_folders(root).splits["train"]
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(arch=args.arch, device=args.device, precision=args.precision))
    cfg = load_config([], [f"optim.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}"])
    tf = train_transform(backbone.preprocess_cfg, "paper")
    rows = []

    loader, sampler = make_train_loader(samples, tf, cfg.optim.batch_size, seed=cfg.train.seed, sampler=cfg.data.sampler,
                                        num_workers=cfg.data.num_workers)
    loader_only = _measure("images: loader only", loader, sampler, lambda x: None, args.repeats, rows)
    with torch.no_grad():
        with_encoder = _measure("images: loader+encoder", loader, sampler, lambda x: encode_images(backbone, x),
                                args.repeats, rows)

    cache = FeatureCache(work / "cache", backbone, args.precision, batch_size=args.batch_size,
                         num_workers=args.num_workers)
    t0 = time.perf_counter()
    feats = cache.features(samples, tf, views=args.views, seed=0, augment="paper")
    _sync()
    build = len(samples) * args.views / (time.perf_counter() - t0)
    rows.append(("cache: build (once)", build, build, build))
    loader, sampler = make_train_loader(samples, tf, cfg.optim.batch_size, seed=cfg.train.seed, sampler=cfg.data.sampler,
                                        num_workers=cfg.data.num_workers, features=feats)
    cached = _measure("cache: features", loader, sampler, lambda x: encode_images(backbone, x), args.repeats, rows)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# loader throughput: {args.arch} on {args.device} ({device}), torch {torch.__version__}, "
          f"{len(samples)} train images {args.image_size}px, batch {args.batch_size}, "
          f"{args.num_workers} workers, {args.views} cached views, median of {args.repeats} epochs")
    print(f"{'path':<26} {'images/s':>11} {'min':>11} {'max':>11}")
    for name, med, lo, hi in rows:
        print(f"{name:<26} {med:>11.1f} {lo:>11.1f} {hi:>11.1f}")
    print(f"speed-up of the image side with the cache: {cached / with_encoder:.1f}x "
          f"(vs loader alone: {cached / loader_only:.1f}x)")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
