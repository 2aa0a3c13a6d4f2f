"""The single-process training loop for prompt methods (SoftCPT, CoOp).

One iteration: frozen image features of the batch, text features of all classes from the
learnable prompts, cosine logits, per-task cross-entropy, one backward, then the optimizer step
(``k`` steps under ``optim.official_stepping``). The lr schedule advances once per epoch.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcpt_dist.config import Config
from softcpt_dist.data.dataset import MultiTaskImageDataset, Sample
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.loss import multitask_cross_entropy
from softcpt_dist.optim import EpochLRSchedule, build_optimizer, steps_per_update
from softcpt_dist.progress import progress

logger = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; only effective before CUDA initializes.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def make_loader(samples: List[Sample], transform, batch_size: int, shuffle: bool, seed: int,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(MultiTaskImageDataset(samples, transform), batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last, num_workers=num_workers, generator=generator,
                      persistent_workers=False, worker_init_fn=_seed_worker if num_workers else None)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def train_prompts(cfg: Config, model, group: TaskGroup, train_samples: List[Sample], transform,
                  run=None, task_weights: Optional[torch.Tensor] = None, tag: str = "") -> List[Dict]:
    """Train ``model.method`` in place; returns one summary record per epoch."""
    ocfg = cfg.optim
    bs = ocfg.batch_size
    # Like Dassl: drop the last partial batch when the set holds at least one full batch.
    loader = make_loader(train_samples, transform, bs, shuffle=True, seed=cfg.train.seed,
                         num_workers=cfg.data.num_workers, drop_last=len(train_samples) >= bs)
    optimizer = build_optimizer(model.learnable_parameters().values(), ocfg)
    schedule = EpochLRSchedule(optimizer, ocfg)
    k = steps_per_update(ocfg, model.method)
    class_task = group.class_task().to(model.backbone.device)
    n_learn = sum(p.numel() for p in model.learnable_parameters().values())
    logger.info("%straining %d learnable parameters on %d images of %d tasks, %d iterations/epoch, "
                "%d epochs, %d optimizer step(s) per iteration", tag, n_learn, len(train_samples), len(group),
                len(loader), ocfg.epochs, k)
    model.train()
    history, step = [], 0
    for epoch in range(ocfg.epochs):
        lr = schedule.lr
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = progress(loader, desc=f"{tag}epoch {epoch + 1}/{ocfg.epochs}", enabled=cfg.train.progress)
        for images, tasks, labels, _ in bar:
            tasks = tasks.to(class_task.device)
            targets = group.global_labels(tasks, labels.to(class_task.device))
            logits = model(images)
            loss = multitask_cross_entropy(logits, tasks, targets, class_task, task_weights)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{tag}non-finite loss {loss.item()} at epoch {epoch + 1}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for _ in range(k):
                optimizer.step()
            step += 1
            with torch.no_grad():
                own = class_task.unsqueeze(0) == tasks.unsqueeze(1)
                pred = logits.masked_fill(~own, float("-inf")).argmax(1)
                correct += int((pred == targets).sum())
            seen += images.shape[0]
            loss_sum += loss.item() * images.shape[0]
            if run is not None and step % cfg.train.log_every == 0:
                run.log_metrics({"kind": "step", "scope": tag.strip(": ") or "joint", "epoch": epoch + 1,
                                 "step": step, "loss": loss.item(), "lr": lr})
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        for _ in range(k):
            schedule.step()
        elapsed = time.perf_counter() - t0
        record = {"kind": "epoch", "scope": tag.strip(": ") or "joint", "epoch": epoch + 1, "step": step,
                  "loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1), "lr": lr,
                  "samples_per_s": seen / elapsed if elapsed > 0 else float("nan")}
        history.append(record)
        if run is not None:
            run.log_metrics(record)
        logger.info("%sepoch %d/%d loss %.4f train acc %.1f%% lr %.3g %.1f img/s", tag, epoch + 1, ocfg.epochs,
                    record["loss"], record["train_acc"], lr, record["samples_per_s"])
    model.eval()
    return history
