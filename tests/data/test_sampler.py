"""Task-balanced distributed sampler: disjoint shards, equal steps, task frequencies, resumption."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from softcpt_dist.config import ConfigError
from softcpt_dist.data.sampler import TaskBalancedBatchSampler, task_probabilities

SIZES = (600, 150, 30)  # a large, a medium and a small task
TASKS = [t for t, n in enumerate(SIZES) for _ in range(n)]


def _ranks(world, **kw):
    return [TaskBalancedBatchSampler(TASKS, 16, seed=5, world_size=world, rank=r, **kw) for r in range(world)]


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_union_shards_disjoint_equal_and_cover_epoch(world):
    samplers = _ranks(world)
    shards = [_epoch(s, 0) for s in samplers]
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    flat = [i for shard in shards for batch in shard for i in batch]
    assert len(flat) == len(set(flat))  # disjoint
    # Covered: everything except a remainder smaller than one global batch.
    assert len(TASKS) - len(flat) < 16 * world
    assert all(len(b) == 16 for shard in shards for b in shard)


def test_union_covers_everything_when_divisible():
    tasks = [t for t, n in enumerate((64, 32)) for _ in range(n)]
    shards = [list(TaskBalancedBatchSampler(tasks, 8, seed=0, world_size=4, rank=r)) for r in range(4)]
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(96))


@pytest.mark.parametrize("kw", [{}, {"mode": "balanced"}, {"mode": "temperature", "temperature": 3.0},
                                {"mode": "union", "tasks_per_batch": 1}, {"mode": "balanced", "tasks_per_batch": 2}])
def test_order_is_a_pure_function_of_seed_and_epoch_and_positions_disjoint(kw):
    a, b = _ranks(2, **kw), _ranks(2, **kw)
    assert [_epoch(s, 3) for s in a] == [_epoch(s, 3) for s in b]
    assert _epoch(a[0], 3) != _epoch(a[0], 4)
    other_seed = TaskBalancedBatchSampler(TASKS, 16, seed=6, world_size=2, rank=0, **kw)
    assert _epoch(other_seed, 3) != _epoch(a[0], 3)
    # Every rank takes its own rows of the same global plan.
    plan = a[0].epoch_batches(2)
    assert _epoch(a[1], 2) == plan[1::2].tolist()


def _task_frequencies(sampler, epochs):
    counts = torch.zeros(len(SIZES))
    for e in range(epochs):
        for batch in _epoch(sampler, e):
            counts += torch.bincount(torch.tensor(TASKS)[batch], minlength=len(SIZES))
    return counts / counts.sum(), int(counts.sum())


@pytest.mark.parametrize("mode,temperature,group", [("union", 1.0, 0), ("balanced", 1.0, 0),
                                                    ("temperature", 2.0, 0), ("balanced", 1.0, 1),
                                                    ("temperature", 2.0, 2), ("union", 1.0, 2)])
def test_task_frequencies_match_mode(mode, temperature, group):
    sampler = TaskBalancedBatchSampler(TASKS, 16, seed=1, mode=mode, temperature=temperature, tasks_per_batch=group)
    freq, n = _task_frequencies(sampler, 20)
    expected = task_probabilities(SIZES, mode, temperature).float()
    # Slots are not independent when a batch draws few tasks: allow 5 binomial sd per batch-of-draws.
    draws = n / 16 * (group or 16)
    tol = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-3
    assert torch.all((freq - expected).abs() <= tol), (freq, expected, tol)
    if mode == "balanced":
        assert torch.allclose(expected, torch.full((3,), 1 / 3, dtype=torch.float32))
    if mode == "temperature":
        root = torch.tensor([math.sqrt(n) for n in SIZES])
        assert torch.allclose(expected, (root / root.sum()).float())


@pytest.mark.parametrize("group", [1, 2])
def test_grouped_micro_batches_hold_at_most_g_tasks(group):
    sampler = TaskBalancedBatchSampler(TASKS, 16, seed=2, mode="balanced", tasks_per_batch=group)
    sizes = {len(set(TASKS[i] for i in b)) for b in _epoch(sampler, 0)}
    assert max(sizes) <= group and (group == 1 or 2 in sizes)


def test_balanced_epoch_visits_small_task_samples_evenly():
    sampler = TaskBalancedBatchSampler(TASKS, 16, seed=3, mode="balanced")
    seen = torch.bincount(torch.tensor([i for b in _epoch(sampler, 0) for i in b]), minlength=len(TASKS))
    small = seen[-SIZES[2]:]
    assert small.max() - small.min() <= 1  # queues cycle through a task before repeating a sample


@pytest.mark.parametrize("kw", [{}, {"mode": "temperature", "tasks_per_batch": 2}])
def test_resume_mid_epoch_continues_the_same_sequence(kw):
    full = TaskBalancedBatchSampler(TASKS, 16, seed=9, world_size=2, rank=1, **kw)
    expected = _epoch(full, 4)
    first = TaskBalancedBatchSampler(TASKS, 16, seed=9, world_size=2, rank=1, **kw)
    first.set_epoch(4)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict(consumed=5)
    resumed = TaskBalancedBatchSampler(TASKS, 16, seed=9, world_size=2, rank=1, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # what a trainer does at the top of the resumed epoch: keeps the position
    assert len(resumed) == len(expected) - 5
    assert head + list(resumed) == expected
    resumed.set_epoch(5)
    assert list(resumed) == _epoch(full, 5)


def test_resume_through_a_loader_with_workers_counts_consumed_batches():
    """Workers fetch ahead of training; the position is what the trainer consumed, not what was fetched."""
    def loader(sampler):
        return DataLoader(TensorDataset(torch.arange(len(TASKS))), batch_sampler=sampler, num_workers=2)
    full = [b[0].tolist() for b in loader(_epoch_sampler(3))]
    sampler = _epoch_sampler(3)
    it = iter(loader(sampler))
    head = [next(it)[0].tolist() for _ in range(3)]
    state = sampler.state_dict(consumed=3)
    del it
    resumed = TaskBalancedBatchSampler(TASKS, 16, seed=4)
    resumed.load_state_dict(state)
    assert head + [b[0].tolist() for b in loader(resumed)] == full


def _epoch_sampler(epoch):
    sampler = TaskBalancedBatchSampler(TASKS, 16, seed=4)
    sampler.set_epoch(epoch)
    return sampler


@pytest.mark.parametrize("change,named", [({"world_size": 4}, "world_size"), ({"mode": "balanced"}, "mode"),
                                          ({"tasks_per_batch": 1}, "tasks_per_batch"), ({"seed": 1}, "seed")])
def test_resume_with_other_settings_is_refused_naming_them(change, named):
    state = TaskBalancedBatchSampler(TASKS, 16, seed=9, world_size=2, rank=0).state_dict(consumed=1)
    kw = {"seed": 9, "world_size": 2, **change}
    with pytest.raises(ConfigError, match=named):
        TaskBalancedBatchSampler(TASKS, 16, rank=0, **kw).load_state_dict(state)
    other_tasks = TASKS[1:] + [0]  # same length, other samples
    with pytest.raises(ConfigError, match="samples"):
        TaskBalancedBatchSampler(other_tasks, 16, seed=9, world_size=2, rank=0).load_state_dict(state)


def test_extreme_temperatures_are_numerically_safe():
    probs = task_probabilities([5000, 50, 0], "temperature", 0.01)
    assert torch.isfinite(probs).all() and probs[0] == pytest.approx(1.0) and probs[2] == 0
    assert task_probabilities([5000, 50, 0], "temperature", 1e6)[:2].tolist() == pytest.approx([0.5, 0.5], abs=1e-4)
    sampler = TaskBalancedBatchSampler(TASKS, 16, seed=0, mode="temperature", temperature=0.01)
    assert len(_epoch(sampler, 0)) == sampler.steps_per_epoch


def test_small_sets_shrink_the_micro_batch():
    sampler = TaskBalancedBatchSampler([0, 0, 1, 1, 1], 32, seed=0, world_size=2, rank=0)
    assert sampler.batch_size == 2 and len(sampler) == 1
    with pytest.raises(ConfigError, match="cannot be shared by 8 ranks"):
        TaskBalancedBatchSampler([0, 1], 4, seed=0, world_size=8, rank=0)
