"""The class-shard planner (pure: no process group) and the cost it balances."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.model import build_method
from softcpt_dist.model.class_shards import plan_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from group_shapes import plant6  # noqa: E402

METHODS = [MethodConfig(variant="NATA"), MethodConfig(variant="NATS"), MethodConfig(variant="CSTA"),
           MethodConfig(name="coop", coop_mode="MT"), MethodConfig(name="coop", coop_mode="CA"),
           MethodConfig(name="zeroshot")]


def _synthetic_cost(sizes, prefix=20, per_class=5):
    """Cost of classes of tasks with ``sizes`` classes: ``prefix`` once per task held, ``per_class`` each."""
    class_task = torch.cat([torch.full((n,), t) for t, n in enumerate(sizes)])

    def cost(pos):
        return prefix * len(torch.unique(class_task[pos])) + per_class * len(pos)
    return class_task, cost


def _check_partition(plan, n):
    joined = torch.cat(plan.shares)
    assert sorted(joined.tolist()) == list(range(n))  # disjoint and complete
    assert torch.equal(joined[plan.inverse], torch.arange(n))  # inverse restores selection order


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_partition_the_selection_and_balance_the_cost(world):
    class_task, cost = _synthetic_cost([36, 5, 9, 15, 12, 39])  # Plant-6's class counts
    plan = plan_shards(class_task, cost, world)
    _check_partition(plan, len(class_task))
    total = cost(torch.arange(len(class_task)))
    # Within one task's shared part and one class of the ideal share.
    assert max(plan.costs) <= total / world + 20 + 5
    assert plan.costs == [cost(s) if len(s) else 0 for s in plan.shares]
    assert plan_shards(class_task, cost, world).shares[0].tolist() == plan.shares[0].tolist()  # deterministic


def _paired_cost(sizes, prefix=20, per_class=5, pair_saving=4):
    """Like ``_synthetic_cost``, but classes ``2k`` and ``2k + 1`` of a task share ``pair_saving`` positions
    (a common leading word) when held together: a cost the fill's per-class estimates cannot see."""
    class_task, base = _synthetic_cost(sizes, prefix, per_class)
    first = torch.cat([torch.arange(n) for n in sizes])
    pair = torch.cumsum(torch.tensor([0] + sizes[:-1]), 0).repeat_interleave(torch.tensor(sizes)) + first // 2 * 2

    def cost(pos):
        held = pair[pos]
        return base(pos) - pair_saving * int((torch.unique(held, return_counts=True)[1] == 2).sum())
    return class_task, cost


@pytest.mark.parametrize("sizes, world", [([8, 7, 11], 2), ([12, 11], 3), ([10, 9, 12, 7], 3)])
def test_refining_the_fill_finds_the_best_split_the_estimates_miss(monkeypatch, sizes, world):
    from softcpt_dist.model import class_shards
    class_task, cost = _paired_cost(sizes)
    plan = plan_shards(class_task, cost, world)
    _check_partition(plan, len(class_task))
    order = list(range(len(class_task)))  # the fill's order: tasks', then classes', ascending
    best = min(max(cost(torch.tensor(order[a:b])) for a, b in zip((0, *cut), (*cut, len(order))))
               for cut in itertools.combinations(range(1, len(order)), world - 1))
    monkeypatch.setattr(class_shards, "_refined", lambda order, bounds, cost: bounds)
    unrefined = plan_shards(class_task, cost, world)
    assert max(plan.costs) < max(unrefined.costs)  # the fill alone leaves a larger share here
    if world == 2:  # one boundary: the local search is exhaustive
        assert max(plan.costs) == best
    assert max(plan.costs) <= best + 5  # within one class of the best contiguous split


def test_whole_tasks_are_kept_when_they_balance():
    class_task, cost = _synthetic_cost([10, 10, 10, 10])
    plan = plan_shards(class_task, cost, 2)
    for share in plan.shares:
        assert len(share) == 20 and len(torch.unique(class_task[share])) == 2


def test_a_task_larger_than_a_share_is_split_by_classes():
    class_task, cost = _synthetic_cost([40, 4])
    plan = plan_shards(class_task, cost, 2)
    assert all(0 in class_task[s].tolist() for s in plan.shares)  # the big task on both ranks
    assert max(plan.costs) <= cost(torch.arange(44)) / 2 + 25


def test_more_ranks_than_tasks_and_than_classes():
    class_task, cost = _synthetic_cost([3])
    plan = plan_shards(class_task, cost, 2)
    _check_partition(plan, 3)
    assert sorted(plan.sizes) == [1, 2]
    plan = plan_shards(class_task, cost, 5)
    _check_partition(plan, 3)
    assert sorted(plan.sizes) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.name}-{m.variant if m.name == 'softcpt' else m.coop_mode}")
@pytest.mark.parametrize("path", ["shared_prefix", "dense"])
def test_the_planned_cost_is_what_the_encoder_encodes(tiny_backbone, method, path):
    group = plant6()
    model = build_method(tiny_backbone, group, method, PromptConfig())
    encoder = tiny_backbone.text_encoder
    old_path, encoder.path = encoder.path, path
    try:
        for index in (torch.arange(group.num_classes), torch.tensor([0, 1, 2, 40, 41, 100]), torch.tensor([7])):
            before = encoder.positions_encoded
            with torch.no_grad():
                full = model(index)
            assert encoder.positions_encoded - before == model.text_positions(index)
            assert full.shape[0] == len(index)
    finally:
        encoder.path = old_path


@pytest.mark.parametrize("variant", ["NATA", "NATS", "CSTA"])
def test_a_selection_encodes_the_same_features_as_all_classes(tiny_backbone, variant):
    """Only the selected classes' task prompts are encoded; each class's feature is unchanged."""
    group = plant6()
    model = build_method(tiny_backbone, group, MethodConfig(variant=variant), PromptConfig())
    with torch.no_grad():
        full = model()
        index = torch.tensor([3, 40, 41, 115])
        part = model(index)
        assert float((part - full[index]).abs().max() / full.abs().max()) <= 1e-6


def test_the_cost_model_adds_text_gather_and_gradient_all_reduce():
    from softcpt_dist.scaling import Link, step_estimate
    link = Link(bandwidth_gb_s=1.0, latency_us=10.0)
    one = step_estimate([1000], rows=10, feature_dim=8, learnable=1000, token_s=1e-3, link=link, fixed_s=0.5)
    assert (one.step_s, one.gather_s, one.reduce_s) == (1.5, 0.0, 0.0)
    two = step_estimate([500, 480], rows=6, feature_dim=8, learnable=1000, token_s=1e-3, link=link)
    assert two.text_s == 0.5
    assert two.gather_bytes == 6 * 8 * (2 + 4)  # the other rank's block: features and fp32 gradients
    assert two.gather_s == pytest.approx(2e-5 + 288 / 1e9)
    assert two.reduce_s == pytest.approx(2e-5 + 4000 / 1e9)
    floor = step_estimate([5, 5], rows=1, feature_dim=8, learnable=0, token_s=1e-3, link=link, kernel_floor_s=0.1)
    assert floor.text_s == 0.1


def test_the_cost_model_prices_class_parallel_scoring_and_gradient_factors():
    from softcpt_dist.scaling import Link, step_estimate
    link = Link(bandwidth_gb_s=1.0, latency_us=10.0)
    common = dict(rows=6, feature_dim=8, learnable=1000 + 64 * 32, token_s=1e-3, link=link)
    two = step_estimate([500, 480], **common, scoring="shares", batch=3, factors=(5 * (64 + 32 + 1), 64 * 32))
    # all-reduces of zero-filled [W, ...] buffers: 2 (W - 1) / W = 1 times the buffer at 2 ranks
    assert two.image_bytes == 2 * 3 * (8 + 2) * 4 and two.stats_bytes == 2 * (4 * 2 * 3 + 1) * 4
    assert two.gather_bytes == two.image_bytes + two.stats_bytes
    guided = step_estimate([500, 480], **common, scoring="shares", batch=3, sample_stats=9)  # ProGrad's 4 + 5
    assert guided.stats_bytes == 2 * (9 * 2 * 3 + 1) * 4
    # the images' all-reduce runs while the share's forward (0.25 s of the 0.5 s text side) encodes
    assert two.gather_s == pytest.approx(2e-5 + two.stats_bytes / 1e9)
    # 2 ranks: a ring all-reduce moves 2 (W - 1) / W = 1 times the tensor; factors and the rest in one
    assert two.factor_bytes == 5 * (64 + 32 + 1) * 4 and two.allreduce_bytes == 4 * 1000
    assert two.reduce_s == pytest.approx(2e-5 + (two.factor_bytes + two.allreduce_bytes) / 1e9)
    # keys costing more than the matrix: the matrix is all-reduced with the rest
    many = step_estimate([500, 480], **common, scoring="shares", batch=3, factors=(40 * (64 + 32 + 1), 64 * 32))
    assert many.factor_bytes == 0 and many.allreduce_bytes == 4 * (1000 + 64 * 32)
    with pytest.raises(ValueError, match="scoring"):
        step_estimate([1, 1], **common, scoring="other")


def test_the_cost_model_counts_hops_as_nccl_does():
    """Ring all-gather W - 1 hops, all-reduce the fewer of the ring's 2 (W - 1) and the tree's
    2 ((ranks per node - 1) + log2 nodes): the same inside a node, far fewer across many nodes."""
    from softcpt_dist.scaling import Link, all_reduce_hops, step_estimate
    assert [all_reduce_hops(w, 8) for w in (1, 2, 4, 8)] == [0, 2, 6, 14]
    assert all_reduce_hops(16, 8) == 2 * (7 + 1) and all_reduce_hops(64, 8) == 2 * (7 + 3)
    assert all_reduce_hops(512, 8) == 2 * (7 + 6) and all_reduce_hops(12, 8) == 2 * (7 + 1)
    assert all_reduce_hops(64, 1) == 2 * 6 and all_reduce_hops(5, 1) == 2 * 3  # one rank a node: a tree of 5
    link = Link(bandwidth_gb_s=1e9, latency_us=10.0)  # latency only
    common = dict(rows=1, feature_dim=8, learnable=10, token_s=0.0, link=link)
    shares = step_estimate([1] * 64, **common, scoring="shares", batch=1)
    gathered = step_estimate([1] * 64, **common, scoring="gathered")
    assert shares.gather_s == pytest.approx(2 * 20 * 1e-5, rel=1e-3)  # two tree all-reduces, no text to hide one
    hidden = step_estimate([1] * 64, **{**common, "token_s": 0.1e-3}, scoring="shares", batch=1)
    assert hidden.gather_s == pytest.approx(20 * 1e-5 + (20 * 1e-5 - 0.05e-3), rel=1e-3)  # the images' partly hidden
    assert gathered.gather_s == pytest.approx(2 * 63 * 1e-5, rel=1e-3)  # ring all-gather + reduce-scatter
    assert shares.reduce_s == pytest.approx(20 * 1e-5, rel=1e-3)


@pytest.mark.parametrize("variant", ["NATA", "CSTA", "CATA"])
def test_meta_networks_exchange_their_cheapest_factor_layout(tiny_backbone, variant):
    """NA: a row per task. CA/CS ([class | task] rows keyed by class): a row per task plus the class part's
    matrix, cheaper than a row per class and than the matrix; the cost model counts the same numbers."""
    from softcpt_dist.model.gradient_factors import GradientFactors
    from softcpt_dist.scaling import Link, predict_scaling
    method = build_method(tiny_backbone, plant6(), MethodConfig(variant=variant), PromptConfig())
    meta = method.meta_net
    out_f, in_f = meta.net.weight.shape
    tasks = len(plant6().tasks)
    if variant == "NATA":
        expected = GradientFactors.elements(tasks, out_f, in_f)
    else:
        expected = GradientFactors.elements(tasks, out_f, in_f, dense_in=in_f // 2)
        assert expected < min(GradientFactors.elements(method.num_classes, out_f, in_f), out_f * in_f)
    assert meta.factor_elements() == expected
    assert meta.record_factors().numel() == expected
    meta.factors = None
    two = predict_scaling(method, [1, 2], 1e-3, Link(100.0, 5.0), scoring="shares", structured=True)[1]
    assert two.factor_bytes == 4 * expected  # 2 ranks: the ring moves the table once


def test_predicted_shares_shrink_until_tasks_split_into_few_classes(tiny_backbone):
    from softcpt_dist.scaling import Link, predict_scaling
    method = build_method(tiny_backbone, plant6(), MethodConfig(variant="NATA"), PromptConfig())
    rows = predict_scaling(method, [1, 2, 8, 64], 1e-3, Link(100.0, 5.0))
    positions = [r.positions for r in rows]
    assert positions[0] == method.text_positions(torch.arange(116))
    assert positions == sorted(positions, reverse=True) and positions[1] <= positions[0] / 2 + 25
    assert positions[-1] > positions[0] / 64  # each share still pays its task's prefix and task prompt
    assert rows[1].speedup > 1.8 and rows[-1].efficiency < rows[1].efficiency



@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.name}-{m.variant if m.name == 'softcpt' else m.coop_mode}")
def test_shares_encode_bitwise_the_features_of_all_classes_at_once(tiny_backbone, method):
    """A class's feature does not depend on which classes are encoded with it, also when a task is
    split over shares: products on at least 4 rows (model/batch_invariance.py) and attention over whole
    blocks of keys (prompt_layout.KEY_BLOCK). With one BLAS thread (as each rank runs in these tests):
    threads split a product by its size, which changes the order of sums again."""
    model = build_method(tiny_backbone, plant6(), method, PromptConfig())
    everything = torch.arange(116)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _assert_shares_bitwise(model, everything)
    finally:
        torch.set_num_threads(threads)


def _assert_shares_bitwise(model, everything):
    with torch.no_grad():
        full = model(everything)
        for world in (2, 3, 8):
            plan = plan_shards(model.class_task, lambda pos: model.text_positions(everything[pos]), world)
            parts = torch.cat([model(share) for share in plan.shares if len(share)])[plan.inverse]
            assert torch.equal(parts, full), world


def test_without_batch_invariance_the_features_differ_by_rounding_only(tiny_backbone):
    from softcpt_dist.config import ModelConfig, TextConfig
    from softcpt_dist.model import build_backbone
    torch.manual_seed(0)  # as the tiny_backbone fixture: the same weights
    plain = build_backbone(ModelConfig(arch="softcpt-tiny"), text=TextConfig(batch_invariant=False))
    features = []
    for backbone in (tiny_backbone, plain):
        torch.manual_seed(1)  # the same learnable tensors
        with torch.no_grad():
            features.append(build_method(backbone, plant6(), MethodConfig(), PromptConfig())())
    a, b = features
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
