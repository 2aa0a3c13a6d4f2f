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
    padded = torch.cat([x, torch.zeros(2, 5)])  # rows beyond `rows` are padding
    factors = GradientFactors()
    (factored_linear(padded, weight.detach(), factors, 3)[:3].sin().sum()).backward()
    grad_x = x.grad.clone()
    x.grad = None
    torch.nn.functional.linear(torch.cat([x, torch.zeros(2, 5)]), weight)[:3].sin().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=0, atol=0)
    dy, inputs = factors.take(12, 5, "cpu")
    assert dy.shape == (3, 12) and inputs.shape == (3, 5)
    torch.testing.assert_close(dy.t() @ inputs, weight.grad, rtol=0, atol=ATOL)
    assert factors.take(12, 5, "cpu")[0].shape == (0, 12)  # taken: forgotten


class _Method(nn.Module):
    def __init__(self, in_dim, rows_big):
        super().__init__()
        self.meta_net = MetaNet(in_dim, 4, 16, "lin")  # a 64 x 32 weight
        self.ctx = nn.Parameter(torch.randn(4, 16))
        self.rows_big = rows_big


class _Model(nn.Module):
    def __init__(self, in_dim=32, rows_big=False):
        super().__init__()
        self.method = _Method(in_dim, rows_big)

    def learnable_parameters(self):
        return dict(self.method.named_parameters())


ROWS = {False: [2, 3], True: [40, 2]}  # per rank: few rows (factors) or more than the matrix is worth


def _loss(model, rank, rows_big):
    torch.manual_seed(100 + rank)
    feats = torch.randn(ROWS[rows_big][rank], 32)
    ctx = model.method.meta_net(feats)  # [n, 2, 6]
    return (ctx.sum(1) * model.method.ctx[:1]).square().sum()


def _worker(rank, world, port, rows_big, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from softcpt_dist.training.gradient_exchange import StructuredGradients
    torch.manual_seed(0)
    model = _Model(rows_big=rows_big)
    exchange = StructuredGradients(model)
    for _ in range(2):  # two accumulated micro-batches
        _loss(model, rank, rows_big).backward()
    exchange.exchange()
    queue.put((rank, {n: p.grad.tolist() for n, p in model.learnable_parameters().items()}, exchange.counters()))
    dist.destroy_process_group()


def _run(rows_big):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx, world = mp.get_context("spawn"), 2
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, rows_big, queue)) for r in range(world)]
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
        model = _Model(rows_big=rows_big)
        for _ in range(2):
            _loss(model, rank, rows_big).backward()
        grads.append({n: p.grad for n, p in model.learnable_parameters().items()})
    expected = {n: sum(g[n] for g in grads) / world for n in grads[0]}
    for rank, (got, counters) in results.items():
        for name, value in expected.items():
            torch.testing.assert_close(torch.tensor(got[name]), value, rtol=1e-6, atol=ATOL)
    return results[0][1]


def test_two_ranks_exchange_the_meta_networks_factors_and_average_everything():
    counters = _run(rows_big=False)
    # 2 micro-batches: rank 1's 6 rows are the most; 2 ranks x 6 rows x (64 + 32) fp32 numbers
    assert counters["factor_bytes"] == 2 * 6 * (64 + 32) * 4
    assert counters["allreduce_bytes"] == 4 * 16 * 4  # the context only


def test_more_rows_than_the_matrix_is_worth_are_all_reduced_as_the_matrix():
    counters = _run(rows_big=True)
    assert counters["factor_bytes"] == 0
    assert counters["allreduce_bytes"] == (4 * 16 + 64 * 32) * 4
