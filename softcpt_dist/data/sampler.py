"""Task-balanced distributed batch sampler: which samples every rank sees at every step.

The order of one epoch is a pure function of ``(seed, epoch)``: every rank builds the same global
sequence of micro-batches and keeps its own (micro-batch ``step * world_size + rank``), so shards
are disjoint, every rank runs the same number of steps, and resuming means skipping steps.

Modes (how often each task is seen):

- ``union`` -- the paper: a uniform permutation of the union of all training samples; each
  sample once per epoch, so task t is seen in proportion to its size n_t.
- ``balanced`` -- every task equally often (small tasks' samples repeat, large tasks' are
  subsampled within the epoch).
- ``temperature`` -- task t with probability proportional to n_t ** (1 / T); T=1 is ``union`` in
  expectation, T -> infinity is ``balanced``.

In the two drawn modes each slot draws a task, then takes that task's next sample from a queue
that runs through the task's samples in a shuffled order (reshuffled whenever it wraps), so within
an epoch a task's samples are seen as evenly as possible (each epoch's queues start afresh).

Task-grouped micro-batches (``tasks_per_batch = G > 0``): each micro-batch holds samples of at
most G tasks, so a rank only encodes those tasks' class prompts. The batch's G task draws follow
the mode's task distribution and each slot takes one of the G draws uniformly, so the frequency of
each task per slot is exactly that of the mode; samples then come from the per-task queues (in
``union`` mode with G > 0 the queues give every sample once per cycle of its task, which is
uniform over the union in expectation rather than an exact permutation).

An epoch holds ``len(samples)`` slots in every mode (so epochs are comparable across modes),
cut into ``steps = len // (world_size * batch_size)`` global steps; a remainder smaller than one
global batch is left out of that epoch (Dassl drops the last partial batch too). If the whole set
is smaller than one global batch, the micro-batch shrinks to ``len // world_size``.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Iterator, List, Sequence

import torch

from softcpt_dist.config import ConfigError, SamplerConfig, choices
from softcpt_dist.seeding import keyed_generator


def task_probabilities(task_sizes: Sequence[int], mode: str, temperature: float = 1.0) -> torch.Tensor:
    """Probability of each task per slot under ``mode`` (computed in log space: any T > 0 is safe)."""
    sizes = torch.as_tensor(task_sizes, dtype=torch.float64)
    if mode == "union":
        logits = sizes.log()
    elif mode == "balanced":
        logits = torch.where(sizes > 0, 0.0, float("-inf")).double()
    elif mode == "temperature":
        if temperature <= 0:
            raise ConfigError(f"data.sampler.temperature must be > 0, got {temperature}")
        logits = sizes.log() / temperature
    else:
        raise ConfigError(f"data.sampler.mode={mode!r} is not one of {list(choices(SamplerConfig, 'mode'))}")
    return torch.softmax(logits, dim=0)


class TaskBalancedBatchSampler:
    """Yields this rank's micro-batches (lists of sample indices) of the current epoch.

    Position: ``set_epoch(e)`` selects the epoch; iteration starts at the epoch's start step (0, or
    the step restored by ``load_state_dict``). The sampler itself does not count what was
    consumed -- a DataLoader with workers fetches ahead -- so the trainer passes the number of
    batches it actually trained on to ``state_dict(consumed)``.
    """

    def __init__(self, sample_tasks: Sequence[int], batch_size: int, *, seed: int, mode: str = "union",
                 temperature: float = 1.0, tasks_per_batch: int = 0, world_size: int = 1, rank: int = 0):
        if not 0 <= rank < world_size:
            raise ConfigError(f"sampler rank {rank} outside world size {world_size}")
        if batch_size <= 0:
            raise ConfigError(f"batch size must be > 0, got {batch_size}")
        if tasks_per_batch < 0:
            raise ConfigError(f"data.sampler.tasks_per_batch must be >= 0, got {tasks_per_batch}")
        self.sample_tasks = torch.as_tensor(list(sample_tasks), dtype=torch.long)
        n = len(self.sample_tasks)
        if n < world_size:
            raise ConfigError(f"{n} training samples cannot be shared by {world_size} ranks")
        n_tasks = int(self.sample_tasks.max()) + 1
        self.task_members: List[torch.Tensor] = [torch.nonzero(self.sample_tasks == t).flatten()
                                                 for t in range(n_tasks)]
        self.probs = task_probabilities([len(m) for m in self.task_members], mode, temperature)
        self.mode, self.temperature, self.tasks_per_batch = mode, temperature, tasks_per_batch
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.batch_size = min(batch_size, n // world_size)
        self.steps_per_epoch = n // (self.batch_size * world_size)
        self.epoch, self.start_step = 0, 0

    # -- position -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; a different epoch than the current one starts at its first step."""
        if epoch != self.epoch:
            self.epoch, self.start_step = epoch, 0

    def settings(self) -> Dict:
        """What the sequence depends on; a resumed run must match all of it."""
        digest = hashlib.sha256(self.sample_tasks.numpy().tobytes()).hexdigest()[:16]
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size, "mode": self.mode,
                "temperature": self.temperature, "tasks_per_batch": self.tasks_per_batch,
                "samples": f"{len(self.sample_tasks)}:{digest}"}

    def state_dict(self, consumed: int) -> Dict:
        """Position after the trainer consumed ``consumed`` batches of this iteration of the epoch."""
        return {"epoch": self.epoch, "step": self.start_step + consumed, **self.settings()}

    def load_state_dict(self, state: Dict) -> None:
        mine = self.settings()
        changed = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise ConfigError("cannot resume the sampler: its settings differ (" + "; ".join(changed) + "); resume "
                              "with the same data, sampler settings, batch size, seed and world size")
        if not 0 <= int(state["step"]) <= self.steps_per_epoch:
            raise ConfigError(f"sampler state step {state['step']} outside the epoch's {self.steps_per_epoch} steps")
        self.epoch, self.start_step = int(state["epoch"]), int(state["step"])

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.epoch_batches(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            yield batches[step * self.world_size + self.rank].tolist()

    # -- the global order -----------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """All ranks' micro-batches of ``epoch``, ``[steps * world_size, batch_size]`` (same on every rank)."""
        g = keyed_generator("sampler", self.seed, epoch)
        n_batches = self.steps_per_epoch * self.world_size
        if self.mode == "union" and self.tasks_per_batch == 0:
            order = torch.randperm(len(self.sample_tasks), generator=g)
            return order[: n_batches * self.batch_size].view(n_batches, self.batch_size)
        slot_tasks = self._slot_tasks(n_batches, g)
        return self._fill_from_queues(slot_tasks, g)

    def _slot_tasks(self, n_batches: int, g: torch.Generator) -> torch.Tensor:
        """Task of every slot ``[n_batches, batch_size]``, each slot distributed as ``self.probs``."""
        b = self.batch_size
        if self.tasks_per_batch == 0:
            return torch.multinomial(self.probs, n_batches * b, replacement=True, generator=g).view(n_batches, b)
        k = min(self.tasks_per_batch, b)
        draws = torch.multinomial(self.probs, n_batches * k, replacement=True, generator=g).view(n_batches, k)
        # Slots spread over the k draws as evenly as possible, in a random arrangement per batch.
        which = torch.arange(b) % k
        perm = torch.argsort(torch.rand(n_batches, b, generator=g), dim=1)
        return torch.gather(draws, 1, which[perm])

    def _fill_from_queues(self, slot_tasks: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        out = torch.empty_like(slot_tasks)
        flat_tasks, flat_out = slot_tasks.flatten(), out.view(-1)
        for t, members in enumerate(self.task_members):
            where = torch.nonzero(flat_tasks == t).flatten()
            if len(where) == 0:
                continue
            cycles = -(-len(where) // len(members))
            queue = torch.cat([members[torch.randperm(len(members), generator=g)] for _ in range(cycles)])
            flat_out[where] = queue[: len(where)]
        return out
