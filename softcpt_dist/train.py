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
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcpt_dist.config import Config
from softcpt_dist.data.dataset import MultiTaskImageDataset, Sample
from softcpt_dist.data.features import CachedFeatureDataset
from softcpt_dist.data.sampler import TaskBalancedBatchSampler
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


def make_loader(samples: List[Sample], transform, batch_size: int, seed: int, num_workers: int = 0,
                features: Optional[torch.Tensor] = None) -> DataLoader:
    """Evaluation loader in sample order: images through ``transform``, or cached ``features``."""
    dataset = (CachedFeatureDataset(samples, features) if features is not None
               else MultiTaskImageDataset(samples, transform))
    num_workers = 0 if features is not None else num_workers  # features are in memory: workers only add IPC
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=_seed_worker if num_workers else None)


def make_train_loader(cfg: Config, samples: List[Sample], transform, features: Optional[torch.Tensor] = None,
                      rank: int = 0, world_size: int = 1) -> Tuple[DataLoader, TaskBalancedBatchSampler]:
    """Training loader driven by the task-balanced sampler (this rank's shard of each epoch)."""
    scfg = cfg.data.sampler
    dataset = (CachedFeatureDataset(samples, features, cfg.train.seed) if features is not None
               else MultiTaskImageDataset(samples, transform))
    sampler = TaskBalancedBatchSampler([s.task for s in samples], cfg.optim.batch_size, seed=cfg.train.seed,
                                       mode=scfg.mode, temperature=scfg.temperature,
                                       tasks_per_batch=scfg.tasks_per_batch, world_size=world_size, rank=rank)
    workers = 0 if features is not None else cfg.data.num_workers  # in-memory features: workers only add IPC
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        generator=torch.Generator().manual_seed(cfg.train.seed),
                        worker_init_fn=_seed_worker if workers else None)
    return loader, sampler


def batch_classes(group: TaskGroup, tasks: torch.Tensor) -> torch.Tensor:
    """Global class indices of the tasks present in a batch (task-grouped micro-batches)."""
    present = torch.unique(tasks).tolist()
    return torch.cat([torch.arange(group.offsets[t], group.offsets[t] + group.tasks[t].num_classes)
                      for t in present]).to(tasks.device)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def train_prompts(cfg: Config, model, group: TaskGroup, train_samples: List[Sample], transform,
                  run=None, task_weights: Optional[torch.Tensor] = None, tag: str = "",
                  features: Optional[torch.Tensor] = None) -> List[Dict]:
    """Train ``model.method`` in place; returns one summary record per epoch.

    ``features``: cached image features of ``train_samples`` (``[N, D]`` or ``[N, V, D]``); the
    image encoder is then skipped. With task-grouped micro-batches only the batch's tasks' class
    prompts are encoded.
    """
    ocfg = cfg.optim
    loader, sampler = make_train_loader(cfg, train_samples, transform, features)
    optimizer = build_optimizer(model.learnable_parameters().values(), ocfg)
    schedule = EpochLRSchedule(optimizer, ocfg)
    k = steps_per_update(ocfg, model.method)
    device = model.backbone.device
    class_task = group.class_task().to(device)
    grouped = cfg.data.sampler.tasks_per_batch > 0
    n_learn = sum(p.numel() for p in model.learnable_parameters().values())
    logger.info("%straining %d learnable parameters on %d %s of %d tasks, %d iterations/epoch (sampler %s%s), "
                "%d epochs, %d optimizer step(s) per iteration", tag, n_learn, len(train_samples),
                "cached feature rows" if features is not None else "images", len(group), len(sampler),
                cfg.data.sampler.mode, f", <= {cfg.data.sampler.tasks_per_batch} tasks/batch" if grouped else "",
                ocfg.epochs, k)
    model.train()
    history, step = [], 0
    for epoch in range(ocfg.epochs):
        sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        lr = schedule.lr
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = progress(loader, desc=f"{tag}epoch {epoch + 1}/{ocfg.epochs}", enabled=cfg.train.progress)
        for inputs, tasks, labels, _ in bar:
            tasks = tasks.to(device)
            targets = group.global_labels(tasks, labels.to(device))
            batch_task = class_task
            if grouped:
                class_index = batch_classes(group, tasks)
                position = torch.full((group.num_classes,), -1, dtype=torch.long, device=device)
                position[class_index] = torch.arange(len(class_index), device=device)
                logits = model(inputs, class_index=class_index)
                targets, batch_task = position[targets], class_task[class_index]
            else:
                logits = model(inputs)
            loss = multitask_cross_entropy(logits, tasks, targets, batch_task, task_weights)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{tag}non-finite loss {loss.item()} at epoch {epoch + 1}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for _ in range(k):
                optimizer.step()
            step += 1
            with torch.no_grad():
                own = batch_task.unsqueeze(0) == tasks.unsqueeze(1)
                pred = logits.masked_fill(~own, float("-inf")).argmax(1)
                correct += int((pred == targets).sum())
            seen += inputs.shape[0]
            loss_sum += loss.item() * inputs.shape[0]
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
        logger.info("%sepoch %d/%d loss %.4f train acc %.1f%% lr %.3g %.1f samples/s", tag, epoch + 1, ocfg.epochs,
                    record["loss"], record["train_acc"], lr, record["samples_per_s"])
    model.eval()
    return history
