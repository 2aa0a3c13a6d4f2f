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
    assert table.shape == (4 * (12 + 5 + 1),) and table.view(4, -1)[:, -1].tolist() == [1, 0, 1, 1]  # key 1: no row
    torch.testing.assert_close(factors.weight_grad(table), weight.grad, rtol=0, atol=ATOL)
    assert not factors.take("cpu").any()  # taken: forgotten


def test_class_aware_rows_split_into_a_task_table_and_the_class_parts_matrix():
    """Rows ``[class feature | task feature]`` keyed by class: the task part factors by task, the class part
    is a matrix; two micro-batches (a class recorded twice) and two ranks' sums averaged give the average
    of the ranks' plain gradients."""
    torch.manual_seed(0)
    class_task = torch.tensor([0, 0, 0, 1, 1, 2])  # 6 classes of 3 tasks
    task_feature, class_feature = torch.randn(3, 4), torch.randn(6, 3)
    weight = torch.randn(10, 7)
    sums, reference = [], torch.zeros_like(weight)
    for micro_batches in ([torch.tensor([0, 1, 3]), torch.tensor([1, 5])], [torch.tensor([2, 4, 0])]):  # 2 ranks
        factors = GradientFactors(keys=6, out_features=10, in_features=7, dense_in=3, key_group=class_task)
        w = weight.clone().requires_grad_(True)
        for keys in micro_batches:
            rows = torch.cat([class_feature[keys], task_feature[class_task[keys]]], dim=1).requires_grad_(True)
            factored_linear(rows, weight, factors, keys).cos().sum().backward()
            torch.nn.functional.linear(rows, w).cos().sum().backward()
        flat = factors.take("cpu")
        assert flat.numel() == GradientFactors.elements(3, 10, 7, 3) == 3 * (10 + 4 + 1) + 10 * 3
        sums.append(flat)
        reference += w.grad / 2
    torch.testing.assert_close(factors.weight_grad((sums[0] + sums[1]) / 2), reference, rtol=0, atol=ATOL)


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


def test_an_fp16_meta_network_records_its_factors_as_the_official_fp16_product():
    """``model.precision=official_fp16``: the fp32 weight applied in fp16 to fp16 task features. Recording
    factors, the output and the input gradient are bitwise the plain fp16 path's, and the weight gradient
    formed from the (fp32) factors equals its fp16 product within fp16 rounding (2^-10 relative)."""
    torch.manual_seed(0)
    meta = MetaNet(32, 4, 16, "lin", key_count=3)
    features = torch.randn(3, 32).half().requires_grad_(True)
    meta.record_factors()
    out = meta(features, torch.tensor([0, 1, 2]))
    (out.float().sin().sum()).backward()
    grad_x = features.grad.clone()
    assert meta.net.weight.grad is None  # the weight's gradient is its factors
    features.grad = None
    meta.factors = None
    ref = meta(features)
    ref.float().sin().sum().backward()
    assert out.dtype == ref.dtype == torch.float16 and torch.equal(out, ref)
    assert torch.equal(grad_x, features.grad)
    grad_w = meta.net.weight.grad
    meta.record_factors()
    meta(features, torch.tensor([0, 1, 2])).float().sin().sum().backward()
    torch.testing.assert_close(meta.factors.weight_grad(meta.factors.take("cpu")), grad_w, rtol=2**-10,
                               atol=2**-10 * float(grad_w.abs().max()))


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


# Rows owned by one rank: 7 classes whose encodings read rows [0, 0, 1, 1, 2, 3, 3] of a [5, 16] tensor; rank 0
# encodes classes 0-2, rank 1 classes 3-6. Rows 0 and 2, 3 are owned (by rank 0, and 1), row 1 is read by
# both ranks, row 4 by neither.
CLASS_ROW = torch.tensor([0, 0, 1, 1, 2, 3, 3])
SHARES = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6])]


class _RowsMethod(_Method):
    def __init__(self, in_dim):
        super().__init__(in_dim)
        self.rows = nn.Parameter(torch.randn(5, 16))

    def class_rows(self):
        return {"rows": CLASS_ROW}


class _RowsModel(_Model):
    def __init__(self, in_dim=32):
        nn.Module.__init__(self)
        self.method = _RowsMethod(in_dim)


def _rows_loss(model, rank, task_features, step):
    torch.manual_seed(300 + 10 * step + rank)
    rows = model.method.rows[CLASS_ROW[SHARES[rank]]]  # this rank's classes' rows
    return _loss(model, rank, task_features) * 1e-3 + (rows * torch.randn_like(rows)).sum() * (rank + 1)


def _train_rows(model, rank, task_features, steps, max_norm, exchange=None):
    """SGD with momentum and weight decay; ``exchange``: the structured exchange (else the caller averages)."""
    opt = torch.optim.SGD(model.learnable_parameters().values(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        _rows_loss(model, rank, task_features, step).backward()
        if exchange is None:
            return opt
        exchange.exchange()
        if max_norm:
            exchange.clip(max_norm)
        opt.step()
    return opt


def _rows_worker(rank, world, port, queue, steps, max_norm):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from softcpt_dist.training.gradient_exchange import StructuredGradients
    torch.manual_seed(0)
    model, task_features = _RowsModel(), torch.randn(KEYS, 32)
    exchange = StructuredGradients(model, SHARES)
    opt = _train_rows(model, rank, task_features, steps, max_norm, exchange)
    stale = model.method.rows.detach().clone()
    exchange.synchronize(opt)
    params = {n: p.detach().clone() for n, p in model.learnable_parameters().items()}
    momentum = opt.state[model.method.rows]["momentum_buffer"].clone()
    queue.put((rank, params, momentum, stale, exchange.counters()))
    dist.destroy_process_group()


def _reference_rows(steps, max_norm):
    """The same training with the ranks' gradients averaged whole (DeepSpeed's reduction) and clipped as
    ``torch.nn.utils.clip_grad_norm_`` (DeepSpeed's coefficient)."""
    torch.manual_seed(0)
    model, task_features = _RowsModel(), torch.randn(KEYS, 32)
    opt = torch.optim.SGD(model.learnable_parameters().values(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in range(steps):
        grads = []
        for rank in range(2):
            opt.zero_grad(set_to_none=True)
            _rows_loss(model, rank, task_features, step).backward()
            grads.append({n: p.grad.clone() for n, p in model.learnable_parameters().items()})
        for n, p in model.learnable_parameters().items():
            p.grad = (grads[0][n] + grads[1][n]) / 2
        if max_norm:
            torch.nn.utils.clip_grad_norm_(model.learnable_parameters().values(), max_norm)
        opt.step()
    return model, opt


def _run_rows(steps, max_norm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rows_worker, args=(r, 2, port, queue, steps, max_norm)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: rest for r, *rest in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_rows_read_by_one_rank_are_not_sent_and_come_back_from_their_owner():
    """Three SGD steps (momentum, weight decay) with a clipping norm the gradients exceed: the owned rows
    never enter the all-reduce; after ``synchronize`` every rank's tensors and momentum equal the reference
    that averages every gradient whole, and before it the other rank's owned rows were stale."""
    steps, max_norm = 3, 0.5
    model, opt = _reference_rows(steps, max_norm)
    expected = {n: p.detach() for n, p in model.learnable_parameters().items()}
    momentum = opt.state[model.method.rows]["momentum_buffer"]
    results = _run_rows(steps, max_norm)
    for rank, (params, got_momentum, stale, counters) in results.items():
        for name, value in expected.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_momentum, momentum, rtol=1e-5, atol=1e-6)
        others = [2, 3] if rank == 0 else [0]  # rows owned by the other rank: stale here before synchronize
        assert not torch.allclose(stale[others], expected["rows"][others], atol=1e-3)
        # per step: the factors, the context, and of the rows only the shared row 1 (not 0, 2, 3; 4 unread)
        assert counters["allreduce_bytes"] == steps * (4 * 16 + 16) * 4


def test_without_clipping_the_owned_rows_train_as_the_reference():
    model, _ = _reference_rows(2, 0.0)
    results = _run_rows(2, 0.0)
    for params, *_ in results.values():
        torch.testing.assert_close(params["rows"], model.method.rows.detach(), rtol=1e-5, atol=1e-6)


def test_the_reference_gradients_exceed_the_clipping_norm():
    """So that the clipped test above clips at every step (its coefficient comes from the global norm)."""
    torch.manual_seed(0)
    model, task_features = _RowsModel(), torch.randn(KEYS, 32)
    for rank in range(2):
        _rows_loss(model, rank, task_features, 0).backward()
    norm = torch.cat([p.grad.reshape(-1) / 2 for p in model.learnable_parameters().values()]).norm()
    assert norm > 4 * 0.5
