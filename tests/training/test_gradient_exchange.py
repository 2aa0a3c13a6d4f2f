"""The structured gradient exchange (``gradient_exchange.py``): the meta network's weight gradient formed from
its all-gathered factors, the rest all-reduced, equals the ranks' averaged gradients (DeepSpeed's reduction);
the factored layer's input gradient and recorded factors are the plain linear layer's."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from softcpt_dist.model.gradient_factors import GradientFactors, factored_linear
from softcpt_dist.model.meta_net import MetaNet

ATOL = 1e-6  # fp32: the rows are summed in another order than per-rank matrices are


def test_a_factored_layer_has_the_linear_layers_input_gradient_and_its_weight_gradient_as_factors():
    torch.manual_seed(0)
    weight = torch.randn(12, 5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    padded = torch.cat([x, torch.zeros(2, 5)])  # rows beyond the keys are padding
    factors = GradientFactors(keys=4, out_features=12, in_features=5)
    keys = torch.tensor([2, 0, 3])
    (factored_linear(padded, weight.detach(), factors, keys)[:3].sin().sum()).backward()
    grad_x = x.grad.clone()
    x.grad = None
    torch.nn.functional.linear(torch.cat([x, torch.zeros(2, 5)]), weight)[:3].sin().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=0, atol=0)
    table = factors.take("cpu")
    assert table.shape == (4, 12 + 5 + 1) and table[:, -1].tolist() == [1, 0, 1, 1]  # key 1: no row
    torch.testing.assert_close(factors.weight_grad(table), weight.grad, rtol=0, atol=ATOL)
    assert not factors.take("cpu").any()  # taken: forgotten


def test_under_fp16_autocast_the_factored_layer_runs_as_the_linear_layer():
    """``model.precision=official_amp``: the forward's product is fp16, and so is the input gradient's."""
    torch.manual_seed(0)
    weight = torch.randn(12, 5)
    x = torch.randn(3, 5, requires_grad=True)
    factors = GradientFactors(keys=3, out_features=12, in_features=5)
    with torch.autocast("cpu", dtype=torch.float16):
        out = factored_linear(x, weight, factors, torch.arange(3))
    out.float().square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        ref = torch.nn.functional.linear(x, w)
    ref.float().square().sum().backward()
    assert out.dtype == ref.dtype == torch.float16 and torch.equal(out, ref)
    torch.testing.assert_close(grad_x, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(factors.weight_grad(factors.take("cpu")), w.grad, rtol=1e-3, atol=1e-3)


class _Method(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.meta_net = MetaNet(in_dim, 4, 16, "lin", key_count=KEYS)  # a 64 x 32 weight, rows keyed by "task"
        self.ctx = nn.Parameter(torch.randn(4, 16))


class _Model(nn.Module):
    def __init__(self, in_dim=32):
        super().__init__()
        self.method = _Method(in_dim)

    def learnable_parameters(self):
        return dict(self.method.named_parameters())


KEYS = 6
# Each rank's rows (task keys): task 1 on both ranks (a task split over ranks), task 5 on neither.
RANK_KEYS = [[0, 1, 2], [1, 3, 4]]


def _loss(model, rank, task_features):
    keys = torch.tensor(RANK_KEYS[rank])
    ctx = model.method.meta_net(task_features[keys], keys)  # [n, 4, 16]
    torch.manual_seed(200 + rank)  # each rank's own (share's) loss on the contexts
    return (ctx.sum(1) * model.method.ctx[:1] * torch.randn(len(keys), 16)).square().sum()


def _worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from softcpt_dist.training.gradient_exchange import StructuredGradients
    torch.manual_seed(0)
    model, task_features = _Model(), torch.randn(KEYS, 32)  # the same task features on every rank
    exchange = StructuredGradients(model)
    for _ in range(2):  # two accumulated micro-batches
        _loss(model, rank, task_features).backward()
    exchange.exchange()
    queue.put((rank, {n: p.grad.tolist() for n, p in model.learnable_parameters().items()}, exchange.counters()))
    dist.destroy_process_group()


def test_two_ranks_exchange_the_meta_networks_factors_and_average_everything():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx, world = mp.get_context("spawn"), 2
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {r: (g, c) for r, g, c in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # The reference: each rank's gradient formed in full, averaged over ranks (DeepSpeed's reduction).
    grads = []
    for rank in range(world):
        torch.manual_seed(0)
        model, task_features = _Model(), torch.randn(KEYS, 32)
        for _ in range(2):
            _loss(model, rank, task_features).backward()
        grads.append({n: p.grad for n, p in model.learnable_parameters().items()})
    expected = {n: sum(g[n] for g in grads) / world for n in grads[0]}
    for rank, (got, counters) in results.items():
        for name, value in expected.items():
            torch.testing.assert_close(torch.tensor(got[name]), value, rtol=1e-6, atol=ATOL)
        assert counters["factor_bytes"] == KEYS * (64 + 32 + 1) * 4  # instead of 64 x 32 x 4
        assert counters["allreduce_bytes"] == 4 * 16 * 4  # the context


def test_keys_costing_more_than_the_matrix_leave_it_to_the_all_reduce():
    from softcpt_dist.training.gradient_exchange import StructuredGradients

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.method = nn.Module()
            self.method.meta_net = MetaNet(32, 4, 16, "lin", key_count=40)  # 40 x 97 > 64 x 32
            self.method.ctx = nn.Parameter(torch.zeros(3))

        def learnable_parameters(self):
            return dict(self.method.named_parameters())

    model = Wide()
    exchange = StructuredGradients(model)
    assert exchange.factored == [] and model.method.meta_net.factors is None
    assert len(exchange.rest) == 2
