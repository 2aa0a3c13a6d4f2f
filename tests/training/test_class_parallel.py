"""Class-parallel text encoding (``text.shard``): 2 ranks train and evaluate exactly as 1 rank does, for
every ZeRO stage, method and batch grouping; the all-gather's gradients; each rank's share of the work.

The matrix runs in two launched jobs (``run_many.py``): one rank (the reference) and two ranks. One rank
runs each optimizer step as 2 accumulated micro-batches of 3, two ranks as one micro-batch of 3 each:
the same micro-batches (the sampler's global sequence is the same) and the same optimization.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_distributed import _env, _epoch_records as _epochs, _losses

pytestmark = pytest.mark.slow  # see pyproject.toml: not in the quick set

HERE = Path(__file__).resolve().parent
# max |two - one| / max |one|: per learnable tensor, and over the logged loss sequence. Measured: most
# cases below 5e-6, the largest 1.3e-5 (ZeRO-3 NATA, task-grouped batches, on an AVX-512 machine).
REL = 2e-5

METHODS = {"nata": ["method.variant=NATA"], "nats": ["method.variant=NATS"], "csta": ["method.variant=CSTA"],
           "coopmt": ["method.name=coop", "method.coop_mode=MT"]}
GROUPED = {"all": [], "grouped": ["data.sampler.tasks_per_batch=1"]}
# CoOp CA trains each task on its own: 2 ranks share 1 task, split by classes.
# KgCoOp (the same, with its per-class loss term, which class-parallel scoring adds share by share).
PER_TASK = {"coopca-pertask": ["method.name=coop", "method.coop_mode=CA"], "kgcoop-pertask": ["method.name=kgcoop", "prompt.n_ctx=4"]}
# (one rank's overrides, two ranks' overrides, one rank's logged losses per two ranks' logged loss, bound).
# Official stepping applies 3 SGD steps per gradient (39 in all), which amplifies the one difference
# left -- the order in which the ranks' gradient contributions are summed -- about 3-fold (measured up
# to 8.4e-5).
SPECIAL = {"nata-accumulated": (["optim.batch_size=12", "engine.grad_accum_steps=4"],
                                ["optim.batch_size=12", "engine.grad_accum_steps=2", "engine.zero_stage=2"], 2, REL),
           "nata-official": (["optim.official_stepping=true"], ["optim.official_stepping=true"], 1, 1e-4),
           # Class contexts kept on their owner rank under gradient clipping that binds at every step (a large
           # step size, a small norm): the norm must be the global one on both ranks.
           "csta-clipped": (["method.variant=CSTA", "optim.lr=0.5", "engine.grad_clip=0.01",
                             "engine.grad_accum_steps=2"],
                            ["method.variant=CSTA", "optim.lr=0.5", "engine.grad_clip=0.01"], 2, REL),
           # The exchange before class-parallel scoring and structured gradients: class features gathered,
           # every gradient all-reduced by DeepSpeed.
           "nata-gathered": (["engine.grad_accum_steps=2"],
                             ["text.scoring=gathered", "engine.gradient_exchange=deepspeed"], 2, REL)}


def _launch_many(nproc, out, common, runs, timeout=900):
    spec = out / f"runs{nproc}.json"
    spec.write_text(json.dumps({"common": common, "runs": runs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "run_many.py"), str(spec)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, small_data_root):
    out = tmp_path_factory.mktemp("shards")
    common = [f"data.root={small_data_root}", "data.shots=0", "data.train_augment=none", "optim.batch_size=6",
              "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=0.002", f"train.output_dir={out}",
              "train.progress=false", "train.log_every=1"]
    cases = {f"{m}-{g}": METHODS[m] + GROUPED[g] for m in METHODS for g in GROUPED} | PER_TASK
    one = {f"one-{name}": [*o, "engine.grad_accum_steps=2"] for name, o in cases.items()}
    one["untrained"] = ["optim.lr=0"]  # the initial tensors: training must move them far beyond REL
    one.update({f"one-{name}": o for name, (o, _, _, _) in SPECIAL.items()})
    # ZeRO-3 references last, as ZeRO-3 swaps in its own linear function for the rest of the process
    # (a different kernel: the two sides of a comparison must share it).
    one.update({f"one-z3-{name}": [*o, "engine.grad_accum_steps=2", "engine.zero_stage=3"]
                for name, o in cases.items()})
    _launch_many(1, out, common, one)
    two = {f"two-z{z}-{name}": [*o, f"engine.zero_stage={z}"] for z in (0, 2, 3) for name, o in cases.items()
           if z == 3 or name not in PER_TASK}
    two = {**{f"two-{name}": t for name, (_, t, _, _) in SPECIAL.items()}, **two}  # ZeRO-3 last here too
    log = _launch_many(2, out, common, two)
    return out, cases, log


def _assert_same(one, two, pair=2, bound=REL):
    """Loss sequence (one rank's ``pair`` consecutive micro-batches are one logged step of two ranks),
    every learnable tensor of every scope, and the test metrics."""
    a = _losses(one)
    pairs = torch.tensor([sum(a[i:i + pair]) / pair for i in range(0, len(a), pair)], dtype=torch.float64)
    b = torch.tensor(_losses(two), dtype=torch.float64)
    assert len(pairs) == len(b) > 0, two.name
    assert _max_rel(b, pairs) <= bound, two.name
    sa, sb = _states(one), _states(two)
    assert sa.keys() == sb.keys(), two.name
    for scope in sa:
        for tensor in sa[scope]:
            assert _max_rel(sb[scope][tensor], sa[scope][tensor]) <= bound, (two.name, scope, tensor)
    ra, rb = (json.loads((r / "results.json").read_text())["tasks"] for r in (one, two))
    assert ra == rb, two.name


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _states(run):
    return torch.load(run / "prompt_checkpoint.pt", weights_only=True)["states"]


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_two_sharded_ranks_train_exactly_as_one(matrix, zero):
    out, cases, _ = matrix
    compared = 0
    for name in cases:
        two = out / f"two-z{zero}-{name}"
        if not two.exists():
            continue
        _assert_same(out / (f"one-z3-{name}" if zero == 3 else f"one-{name}"), two)
        compared += 1
    assert compared == (len(cases) if zero == 3 else len(cases) - len(PER_TASK))


@pytest.mark.parametrize("name", list(SPECIAL))
def test_two_sharded_ranks_accumulate_and_step_officially_as_one(matrix, name):
    out = matrix[0]
    _assert_same(out / f"one-{name}", out / f"two-{name}", *SPECIAL[name][2:])


def test_the_matrix_trains_far_beyond_its_tolerance(matrix):
    out, _, _ = matrix
    start, end = _states(out / "untrained")["joint"], _states(out / "one-nata-all")["joint"]
    assert all(_max_rel(end[t], start[t]) > 1000 * REL for t in start)


def test_each_rank_encodes_about_half_of_the_token_positions(matrix):
    out, _, _ = matrix
    for name in ("nata-all", "csta-all", "coopmt-all"):
        alone = _epochs(out / f"one-{name}")[-1]["text_positions_per_step"][0]
        for record in _epochs(out / f"two-z0-{name}"):
            per_rank = record["text_positions_per_step"]
            assert len(per_rank) == 2
            # A rank's share: half of one rank's work, give or take a task's shared prefix and task prompt
            # (25 positions here; CoOp-MT's one prefix, shared by all tasks, is paid by both ranks).
            assert all(abs(p - alone / 2) <= 25 for p in per_rank), (name, per_rank, alone)
            assert sum(per_rank) <= alone + 25
            # Class-parallel scoring: image features and softmax statistics move, class features never.
            assert record["image_gather_bytes_per_step"] > 0 and record["softmax_stats_bytes_per_step"] > 0
            assert record["text_gather_bytes_per_step"] == record["text_grad_reduce_bytes_per_step"] == 0
            # The meta network's gradient goes as factors (CoOp has none); the rest is all-reduced.
            assert (record["grad_factor_bytes_per_step"] > 0) == (name != "coopmt-all")
            assert record["grad_allreduce_bytes_per_step"] > 0
            assert all(b > 0 for b in record["text_activation_bytes"])
        assert _epochs(out / f"one-{name}")[-1]["text_gather_bytes_per_step"] == 0
    gathered = _epochs(out / "two-nata-gathered")[-1]
    assert gathered["text_gather_bytes_per_step"] > 0 and gathered["image_gather_bytes_per_step"] == 0
    assert gathered["grad_factor_bytes_per_step"] == 0 and gathered["grad_allreduce_bytes_per_step"] > 0


def test_text_shard_off_encodes_everything_on_every_rank(small_data_root, tmp_path):
    common = [f"data.root={small_data_root}", "data.shots=0", "data.train_augment=none", "optim.batch_size=6",
              "optim.epochs=1", f"train.output_dir={tmp_path}", "train.progress=false"]
    _launch_many(2, tmp_path, common, {"off": ["text.shard=off"], "auto": []})
    off, auto = _epochs(tmp_path / "off")[0], _epochs(tmp_path / "auto")[0]
    assert off["text_positions_per_step"][0] == off["text_positions_per_step"][1] > max(auto["text_positions_per_step"])
    assert off["text_gather_bytes_per_step"] == 0
    assert json.loads((tmp_path / "off" / "results.json").read_text())["tasks"] == \
        json.loads((tmp_path / "auto" / "results.json").read_text())["tasks"]


def test_three_zero3_ranks_with_an_empty_share_train_exactly_as_one(small_data_root, tmp_path):
    """The 2-class task on 3 ranks: one rank's share is empty, so it encodes a stand-in class (ZeRO-3's
    partitioned forwards and backwards must stay in step) whose gradient is zero."""
    common = [f"data.root={small_data_root}", "data.tasks=[size]", "data.shots=0", "data.train_augment=none",
              "optim.batch_size=6", "optim.epochs=1", "optim.warmup_epochs=0", f"train.output_dir={tmp_path}",
              "train.progress=false", "train.log_every=1", "method.name=coop", "method.coop_mode=CA"]
    _launch_many(1, tmp_path, common, {"one": ["engine.grad_accum_steps=3", "engine.zero_stage=3"]})
    _launch_many(3, tmp_path, common, {"three": ["engine.zero_stage=3"]})
    one, three = tmp_path / "one", tmp_path / "three"
    assert _epochs(three)[0]["text_positions_per_step"][2] > 0  # the stand-in is encoded
    _assert_same(one, three, pair=3)


# -- the all-gather itself, on 3 gloo ranks (one with an empty share) --------------------------------------

SIZES = [3, 0, 2]


def _gather_worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from softcpt_dist.distributed import gather_rows
    torch.manual_seed(0)
    weight = torch.randn(4, 5, requires_grad=True)  # the "encoder", replicated
    inputs, images = torch.randn(5, 4), torch.randn(3 * world, 5)  # all classes' inputs; each rank's images
    start = sum(SIZES[:rank])
    mine = inputs[start:start + SIZES[rank]] if SIZES[rank] else inputs[:1]  # a stand-in where empty
    feats = gather_rows(mine @ weight, SIZES, contributes=SIZES[rank] > 0)
    loss = (images[3 * rank:3 * rank + 3] @ feats.t()).logsumexp(1).mean()
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    # Plain lists, not tensors: a tensor on a queue is shared through a file descriptor the parent must fetch
    # from this process while it is alive, and this process may have exited by then.
    queue.put((rank, feats.detach().tolist(), (grad / world).tolist()))  # averaged over ranks, as DeepSpeed does
    dist.destroy_process_group()


def test_gather_rows_returns_every_share_and_the_global_gradient():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx, world = mp.get_context("spawn"), len(SIZES)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {r: (torch.tensor(f), torch.tensor(g)) for r, f, g in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    torch.manual_seed(0)
    weight = torch.randn(4, 5, requires_grad=True)
    inputs, images = torch.randn(5, 4), torch.randn(3 * world, 5)
    feats = inputs @ weight
    # The global loss: each rank's mean, averaged over ranks.
    loss = sum((images[3 * r:3 * r + 3] @ feats.t()).logsumexp(1).mean() for r in range(world)) / world
    loss.backward()
    for rank, (f, g) in results.items():
        torch.testing.assert_close(f, feats.detach(), rtol=0, atol=0)
        torch.testing.assert_close(g, weight.grad, rtol=1e-6, atol=1e-7)
