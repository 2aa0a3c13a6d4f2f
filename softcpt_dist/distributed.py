"""Who am I in the job: world information as a pure function of the environment, and the process group.

Launchers and the variables they set:

- ``torchrun`` and the ``deepspeed`` launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
- ``srun`` (one task per rank): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``,
  ``SLURM_STEP_TASKS_PER_NODE`` and the node list (only inside an srun step: the batch script
  itself also has ``SLURM_PROCID``); ``MASTER_ADDR`` comes from the environment (our SLURM scripts
  export the first node) or else the first host of the step's node list;
- nothing: one process, no launcher needed.

``RANK`` wins over ``SLURM_PROCID``: ``srun torchrun ...`` (one task per node) is a torchrun launch.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # none | env (torchrun or the deepspeed launcher: RANK/WORLD_SIZE set) | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node[03-05,9],gpu1`` -> ``node03``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def world_info_from_env(env: Optional[Mapping[str, str]] = None) -> WorldInfo:
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return WorldInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR", "127.0.0.1"), port,
                         "env")
    # Inside an srun step (not the batch script itself, which also carries SLURM_PROCID/SLURM_NTASKS).
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "1"))
        local_world = int(re.match(r"\d+", per_node).group(0))
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get(
            "SLURM_JOB_NODELIST", "127.0.0.1")))
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            port = 20000 + int(env["SLURM_JOB_ID"]) % 10000  # per job, same on every task, below ephemeral ports
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         local_world, addr, port, "slurm")
    return WorldInfo()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(info: WorldInfo, device: str, timeout_s: float, backend: str = "auto") -> None:
    """Join (or, for one process, create) the default process group; idempotent.

    ``timeout_s`` bounds every collective: if a rank dies, the others fail and exit instead of hanging.
    """
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if info.launcher == "none":
        init_method = f"tcp://127.0.0.1:{_free_port()}"  # a private one-process group: no launcher needed
    else:
        # env:// also reuses torchrun's own store (TORCHELASTIC_USE_AGENT_STORE), even for one rank.
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        init_method = "env://"
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=info.rank,
                            world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("process group: %s, rank %d of %d (launcher %s)", backend, info.rank, info.world_size,
                info.launcher)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce of a (small) tensor on whatever device the backend needs; returns it where it was."""
    if world_size() == 1:
        return value
    out = value.to(_collective_device())
    dist.all_reduce(out, op=op)
    return out.to(value.device)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    return bool(all_reduce(torch.tensor([float(flag)])).item() > 0)


def all_gather_objects(obj: Any) -> List[Any]:
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def launcher_env(info: WorldInfo):
    """Launcher variables for libraries that read them (DeepSpeed) when no launcher set them
    (single process, srun). ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` stay set for the whole process
    (ZeRO-3 reads ``LOCAL_RANK`` in every forward); ``RANK``/``WORLD_SIZE`` are removed again
    afterwards, so child processes never mistake themselves for launched ranks."""
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    added = []
    for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size)):
        if key not in os.environ:
            os.environ[key] = str(value)
            added.append(key)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def quiet_non_main_ranks(info: WorldInfo) -> None:
    """Ranks other than 0 log warnings and errors only."""
    if not info.is_main:
        logging.getLogger("softcpt_dist").setLevel(logging.WARNING)


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of different sizes; backward sums each block's gradient over ranks
    (a reduce-scatter) and returns it to the rank that contributed the block."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: List[int], contributes: bool) -> torch.Tensor:
        ctx.sizes, ctx.contributes, ctx.shape, ctx.dtype = sizes, contributes, local.shape, local.dtype
        return all_gather_padded(local if contributes else local[:0], sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, me, most = ctx.sizes, rank(), max(ctx.sizes)
        device = _collective_device()
        # Summed in fp32 (also for bf16/fp16 features): the sum over ranks is the only new rounding.
        stacked = grad.new_zeros(len(sizes), most, grad.shape[1], dtype=torch.float32, device=device)
        for r, part in enumerate(grad.split(sizes)):
            stacked[r, : sizes[r]] = part.float()
        if dist.get_backend() == "nccl":
            mine = stacked.new_empty(most, grad.shape[1])
            dist.reduce_scatter_tensor(mine, stacked.view(-1, grad.shape[1]))
        else:  # gloo has no reduce-scatter: an all-reduce, of which each rank keeps its block
            dist.all_reduce(stacked)
            mine = stacked[me]
        if not ctx.contributes:  # the stand-in: every rank joined the collective, its gradient is zero
            return grad.new_zeros(ctx.shape, dtype=ctx.dtype), None, None
        return mine[: sizes[me]].to(grad.device, ctx.dtype), None, None


def gather_rows(local: torch.Tensor, sizes: Sequence[int], contributes: bool = True) -> torch.Tensor:
    """``[sum(sizes), E]``: every rank's rows ``local [sizes[rank], E]``, in rank order, on every rank.

    Autograd-aware: the gradient reaching a rank's block from all ranks' losses is summed and
    handed back to that rank (so ``backward`` through its own encoder sees the global gradient).
    ``contributes=False``: ``local`` is a stand-in (``sizes[rank]`` is 0) that every rank must still
    compute -- e.g. so that ZeRO-3 ranks run the same partitioned forwards -- and whose gradient is
    exactly zero. ``sizes`` must be the same on every rank.
    """
    sizes = [int(n) for n in sizes]
    if world_size() == 1:
        return local if contributes else local[:0]
    if contributes and local.shape[0] != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {local.shape[0]} rows, the plan says {sizes[rank()]}")
    return _GatherRows.apply(local, sizes, contributes)


class Pending:
    """A collective in flight (``async_op``): ``wait()`` returns its result. Lets a step start an exchange
    before work that does not need it (class-parallel scoring gathers the images while the text encodes)."""

    def __init__(self, work, result: Callable[[], Any]):
        self._work, self._result = work, result

    def wait(self) -> Any:
        if self._work is not None:
            self._work.wait()
        return self._result()


def all_gather_padded(local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``[sum(sizes), ...]``: every rank's rows ``local [sizes[rank], ...]`` in rank order, on every rank;
    no gradient (for inputs, such as a step's frozen image features). Exchanged by ``gather_by_sum``."""
    return start_gather_padded(local, sizes).wait()


def start_gather_padded(local: torch.Tensor, sizes: Sequence[int]) -> Pending:
    """``all_gather_padded``, started: the rows come from the returned ``Pending``'s ``wait()``."""
    sizes = [int(n) for n in sizes]
    if world_size() == 1:
        return Pending(None, lambda: local)
    padded = local.new_zeros(max(sizes), *local.shape[1:])
    padded[:local.shape[0]] = local.detach()
    pending = start_gather_by_sum(padded)
    return Pending(None, lambda: torch.cat([b[:n] for b, n in zip(pending.wait(), sizes)]))


def gather_by_sum(local: torch.Tensor) -> torch.Tensor:
    """``[W, *local.shape]``: every rank's ``local`` in rank order, by one all-reduce of a zero-filled
    buffer in which each rank fills its own slot. Equal to an all-gather bit for bit (``x + 0 == x``), but
    an all-reduce, which NCCL may run as a tree: its latency grows as the log of the node count
    (``2 ((ranks per node - 1) + log2 nodes)`` hops), where a ring all-gather's grows as ``W - 1``. For the
    small per-step tensors of class-parallel scoring that latency is the whole cost; the buffer is W
    times the local tensor, so large tensors (class features) keep the ring all-gather."""
    return start_gather_by_sum(local).wait()


def start_gather_by_sum(local: torch.Tensor) -> Pending:
    """``gather_by_sum``, started (``async_op``): the result comes from the returned ``Pending``'s ``wait()``."""
    if world_size() == 1:
        return Pending(None, lambda: local.detach().unsqueeze(0).clone())
    buffer = torch.zeros(world_size(), *local.shape, dtype=local.dtype, device=_collective_device())
    buffer[rank()] = local.detach()
    return Pending(dist.all_reduce(buffer, async_op=True), lambda: buffer.to(local.device))


def all_reduce_traffic(nbytes: int, world: int) -> int:
    """Bytes a rank sends (and receives) in an all-reduce of ``nbytes`` over ``world`` ranks: a ring's
    ``2 (W - 1) / W`` times the tensor (a tree's is about twice the tensor, the same to within W / (W - 1))."""
    return 2 * (world - 1) * nbytes // world


class _GatherOwnSlot(torch.autograd.Function):
    """All-gather of equal-shape tensors, ``[W, *shape]`` (``gather_by_sum``); backward hands each rank
    the gradient of its own slot times ``scale``. Right when every rank computes the same function of the gathered tensor:
    the gradient of slot ``r`` is then the same on every rank, and rank ``r``'s own is the one to use."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return gather_by_sum(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[rank()] * ctx.scale, None


def gather_own_gradient(local: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``[W, *local.shape]``: every rank's ``local``, in rank order. Autograd-aware for a function that
    every rank computes alike from the result (a loss replicated on every rank): the backward gives this
    rank the gradient of its own slot, times ``scale``, and communicates nothing."""
    return _GatherOwnSlot.apply(local, scale)
