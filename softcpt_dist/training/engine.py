"""The training engine: the prompt classifier on DeepSpeed (ZeRO 0-3), on one process or many.

Only learnable tensors reach the optimizer (our SGD/AdamW, handed to DeepSpeed as a client
optimizer); the frozen CLIP is part of the wrapped module, so under ZeRO-3 its weights are
partitioned across ranks and gathered inside each submodule's ``forward()``. The same engine runs
a single process without any launcher (a private one-process group), so there is one code path.

Precision: the frozen CLIP runs in ``model.precision``; learnable tensors, gradients and optimizer
state stay fp32 (DeepSpeed's own bf16/fp16 sections can still be passed through ``engine.deepspeed``),
except in ``model.precision=official_fp16``, where the contexts, their gradients and their optimizer state
are fp16, updated in place on ZeRO-0, as the official code does; ``official_amp`` runs the forward and
the loss under fp16 autocast with dynamic loss scaling (``loss_scale.py``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import torch

from softcpt_dist.config import ConfigError, EngineConfig, OptimConfig
from softcpt_dist import distributed as D
from softcpt_dist.distributed import WorldInfo, launcher_env
from softcpt_dist.training.checkpoint import read_state_file
from softcpt_dist.training.gradient_exchange import StructuredGradients
from softcpt_dist.training.gradient_projection import GuideGradients
from softcpt_dist.training.loss_scale import LossScale, skipped_step
from softcpt_dist.training.optim import EpochLRSchedule, build_optimizer, steps_per_update

logger = logging.getLogger(__name__)


class StaleBuildLock(RuntimeError):
    """A JIT op build of DeepSpeed's is locked and nobody is building: the message names the lock."""


def extensions_dir() -> Path:
    """Where DeepSpeed JIT-builds its ops: a folder of this installation's own (``TORCH_EXTENSIONS_DIR``
    unless set), so that environments sharing ``~/.cache/torch_extensions`` never rebuild each other's."""
    own = Path(sys.prefix) / "var" / "softcpt_dist" / "torch_extensions"
    if os.access(sys.prefix, os.W_OK):
        return own
    digest = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "softcpt_dist" / f"torch_extensions-{digest}"


def _someone_builds_in(folder: Path) -> bool:
    """Whether a process works in ``folder`` (torch runs ninja there while it builds)."""
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if cwd.resolve() == folder.resolve():
                return True
        except OSError:
            continue
    return not Path("/proc/self/cwd").exists()  # no /proc: cannot tell, assume a build runs


def clear_stale_build_locks(root: Path, wait_s: float = 120.0, min_age_s: float = 60.0) -> None:
    """Wait (bounded) for op builds in ``root`` that hold a lock; remove a lock that a killed build left
    behind (older than ``min_age_s``, nobody building); else, after ``wait_s``, fail naming the lock."""
    deadline = time.monotonic() + wait_s
    for lock in sorted(Path(root).glob("*/lock")):  # <root>/<op name>/lock, as torch builds there
        while lock.exists():
            if time.time() - lock.stat().st_mtime > min_age_s and not _someone_builds_in(lock.parent):
                lock.unlink(missing_ok=True)
                logger.warning("removed the stale build lock %s (an interrupted DeepSpeed op build left it)", lock)
            elif time.monotonic() > deadline:
                raise StaleBuildLock(f"DeepSpeed's op build in {lock.parent} has held {lock} for over {wait_s:.0f} s; "
                                     "if no build is running, delete that file and rerun")
            else:
                time.sleep(1.0)


def import_deepspeed():
    """DeepSpeed, with its CPU accelerator selected on machines without CUDA and its JIT builds in this
    installation's own folder, free of stale locks (all set before import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def prebuild_ops() -> Dict[str, str]:
    """Build ahead of time the ops DeepSpeed would JIT-build on first use here (on CPU: its shared-memory
    communication op); ``{op name: build folder}``."""
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator
    built = {}
    if get_accelerator().device_name() == "cpu":
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
            built[builder.NAME] = os.environ["TORCH_EXTENSIONS_DIR"]
    return built


SHM_OP = "deepspeed_shm_comm"


@contextmanager
def no_shm_op_for_one_rank(deepspeed, world_size: int):
    """DeepSpeed's CPU communication backend JIT-compiles its shared-memory collective op when it starts
    (about 30 s on a fresh machine), even for one process, which has no peer to share memory with. For
    one rank the op is marked unavailable while the backend starts; with several it is built as before."""
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if world_size != 1 or not isinstance(compatible, dict) or SHM_OP not in compatible:
        yield
        return
    before = compatible[SHM_OP]
    compatible[SHM_OP] = False
    try:
        yield
    finally:
        compatible[SHM_OP] = before


def check_repeated_steps(k: int, ecfg: EngineConfig) -> None:
    """``k`` optimizer steps per gradient (official stepping) need a plain, unpartitioned optimizer."""
    if k > 1 and (ecfg.zero_stage > 0 or ecfg.grad_clip > 0 or ecfg.grad_accum_steps > 1):
        raise ConfigError("optim.official_stepping repeats optimizer steps on one gradient: it needs "
                          "engine.zero_stage=0, engine.grad_clip=0 and engine.grad_accum_steps=1")


def micro_batch_size(optim: OptimConfig, engine: EngineConfig, world_size: int) -> int:
    """Per-rank micro-batch: the global ``optim.batch_size`` split over ranks and accumulation steps."""
    parts = world_size * engine.grad_accum_steps
    if optim.batch_size % parts:
        raise ConfigError(f"optim.batch_size={optim.batch_size} (the global batch) is not divisible by "
                          f"world_size x engine.grad_accum_steps = {world_size} x {engine.grad_accum_steps}")
    return optim.batch_size // parts


def _merge(base: Dict, extra: Dict) -> Dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


DS_DEFAULT_BUCKET = 500_000_000  # elements: DeepSpeed's reduce / all-gather bucket size


def deepspeed_config(ecfg: EngineConfig, world_size: int, micro_batch: int, learnable: Optional[int] = None) -> Dict:
    """DeepSpeed's config of this engine; ``engine.deepspeed`` keys are merged last (they win). With
    ``learnable`` (elements of the learnable tensors), ZeRO's gradient buckets are sized to hold them all
    at once instead of DeepSpeed's 5e8 elements (2 GB per rank in fp32, allocated for a few million
    learnable elements at most): the same reductions, bitwise, without that memory and its cost.

    ZeRO-3 keeps ``torch.nn.functional.linear``: DeepSpeed's memory-efficient linear replaces it for the
    rest of the process (every later model in that process, TorchScript export included, would run through
    it); its saving is the gathered weight kept for backward, which the frozen encoders re-gather anyway."""
    base = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ecfg.grad_accum_steps,
        "train_batch_size": micro_batch * ecfg.grad_accum_steps * world_size,
        "zero_optimization": {"stage": ecfg.zero_stage, "memory_efficient_linear": False},
        "gradient_clipping": ecfg.grad_clip,
        "zero_allow_untested_optimizer": True,  # our SGD/AdamW as client optimizer
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if learnable is not None and ecfg.zero_stage > 0:
        bucket = min(DS_DEFAULT_BUCKET, max(int(learnable), 1))
        base["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    return _merge(base, dict(ecfg.deepspeed or {}))


def exchanges_by_structure(ecfg: EngineConfig, method) -> bool:
    """Whether several ranks exchange the learnable gradients by their structure (``gradient_exchange.py``)
    rather than by DeepSpeed's reduction: ``engine.gradient_exchange=structured`` under ZeRO-0, except for a
    gradient-projecting method (ProGrad). fp16 gradients (``model.precision=official_fp16``) are exchanged
    in fp32 and stored back in fp16."""
    return ecfg.gradient_exchange == "structured" and ecfg.zero_stage == 0 and not method.projects_gradient


class TrainEngine:
    """forward / backward / step for the learnable prompts, plus their state for checkpoints."""

    def __init__(self, model, optim: OptimConfig, ecfg: EngineConfig, world: WorldInfo, micro_batch: int,
                 amp: bool = False, fixed_classes: bool = False):
        """``fixed_classes``: every step encodes every class (no task-grouped batches, no class sampling), so
        the ranks' class shares are the same all run and rows read by one rank stay there
        (``gradient_exchange.py``)."""
        self.model, self.optim_cfg, self.ecfg = model, optim, ecfg
        self.k = steps_per_update(optim, model.method)
        # model.precision=official_amp: fp16 autocast and loss scaling; the official amp path steps the
        # optimizer once per batch (its schedule still advances k times an epoch)
        self.loss_scale = LossScale() if amp else None
        self.autocast_device = next(iter(model.learnable_parameters().values())).device.type if amp else None
        self.optimizer_steps = 1 if amp else self.k
        check_repeated_steps(self.k, ecfg)
        model.method.check_engine(model.method.method_cfg, ecfg)
        self.guide = GuideGradients(model, ecfg.grad_accum_steps) if model.method.projects_gradient else None
        model.backbone.set_grad_checkpointing(ecfg.activation_checkpointing)
        deepspeed = import_deepspeed()
        self.optimizer = build_optimizer(model.learnable_parameters().values(), optim)
        self.schedule = EpochLRSchedule(self.optimizer, optim)
        self.reduces_fp16 = any(p.dtype == torch.float16 for p in model.learnable_parameters().values())
        # ZeRO-0 on several ranks: the gradients exchanged by their structure (gradient_exchange.py), not by
        # DeepSpeed's all-reduce of every tensor.
        self.structured = None
        if D.world_size() > 1 and exchanges_by_structure(ecfg, model.method):
            shares = model.shards.plan(model.method, torch.arange(model.method.num_classes)).shares \
                if fixed_classes and model.shards is not None else None
            self.structured = StructuredGradients(model, shares)
        # Rows kept on their owners need the global norm, which DeepSpeed's clipping (each rank's own norm,
        # averaged over ranks) cannot form: the engine clips them itself.
        self.clips_itself = self.structured is not None and bool(self.structured.owned) and ecfg.grad_clip > 0
        # The process group's world size, as the loader's.
        self.ds_config = deepspeed_config(ecfg, D.world_size(), micro_batch, self.num_learnable())
        if self.clips_itself:
            self.ds_config["gradient_clipping"] = 0.0
        with launcher_env(world), no_shm_op_for_one_rank(deepspeed, D.world_size()):
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config,
                                                        dist_init_required=False)
        # DeepSpeed reads its checkpoint files with weights_only=False, which would run any code a file
        # carries: every file it reads goes through our weights-only reader instead.
        self.engine.checkpoint_engine.load = self._read_file
        self.zero3 = ecfg.zero_stage == 3
        # fp16 learnable tensors (model.precision=official_fp16, ZeRO-0) under engine.gradient_exchange=deepspeed:
        # their gradients are averaged over ranks here, as DeepSpeed's own reduction would (sum, then 1/world),
        # which on CPUs without oneDNN fp16 refuses fp16 gradients.
        if self.reduces_fp16 or self.structured is not None:
            self.engine.enable_backward_allreduce = False
        self.deepspeed_reduced_bytes = 0

    def gradient_counters(self) -> Dict[str, int]:
        """Running totals of this rank's learnable-gradient exchange, as the fp32 size of what is all-reduced:
        the meta network's factor tables and the other gradients."""
        if self.structured is not None:
            return self.structured.counters()
        return {"factor_bytes": 0, "allreduce_bytes": self.deepspeed_reduced_bytes}

    @staticmethod
    def state_classes() -> list:
        """The plain state classes DeepSpeed's checkpoint files hold besides tensors and containers."""
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def _read_file(self, path, map_location=None):
        return read_state_file(path, self.state_classes(), map_location)

    def __call__(self, inputs, class_index: Optional[torch.Tensor] = None, targets=None):
        if self.loss_scale is None:
            return self.engine(inputs, class_index=class_index, targets=targets)
        with torch.autocast(self.autocast_device, dtype=torch.float16):
            return self.engine(inputs, class_index=class_index, targets=targets)

    def backward(self, loss: torch.Tensor) -> None:
        if self.guide is not None:  # the guide loss's gradient first, on the graph the main backward frees
            self.guide.accumulate(self.model.guide_loss)
        self.engine.backward(loss if self.loss_scale is None else self.loss_scale.scaled(loss))
        if self.engine.is_gradient_accumulation_boundary() and D.world_size() > 1:
            if self.structured is not None:
                self.structured.exchange()
            else:  # DeepSpeed's reduction (or the fp16 one below): every learnable tensor, whole
                self.deepspeed_reduced_bytes += 4 * self.num_learnable()
        if (self.reduces_fp16 and self.structured is None and self.engine.is_gradient_accumulation_boundary()
                and D.world_size() > 1):
            for p in self.model.learnable_parameters().values():
                if p.grad is not None:
                    p.grad.copy_(D.all_reduce(p.grad)).mul_(1.0 / D.world_size())

    def step(self) -> None:
        """Optimizer step at an accumulation boundary (``k`` steps under official stepping); a projecting
        method's projection first, on the reduced gradient."""
        if self.guide is not None and self.engine.is_gradient_accumulation_boundary():
            self.guide.project()
        if self.loss_scale is not None and self.engine.is_gradient_accumulation_boundary():
            finite = self.loss_scale.unscale(self.model.learnable_parameters().values())
            if finite:
                self._clip()
                self.engine.step()
            else:  # GradScaler's rule: no step on non-finite gradients, a smaller scale
                with skipped_step(self.engine.optimizer):
                    self.engine.step()
            self.loss_scale.update(finite)
            if not finite:  # after update: the log gives the new scale
                logger.info("loss scaling: non-finite gradients, optimizer step skipped; scale now %g",
                            self.loss_scale.scale)
            return
        if self.optimizer_steps > 1:
            for _ in range(self.optimizer_steps - 1):  # same reduced gradient, as the official code does
                self.engine.optimizer.step()
        if self.engine.is_gradient_accumulation_boundary():
            self._clip()
        self.engine.step()

    def _clip(self) -> None:
        """Where DeepSpeed's clipping would run (at a boundary, before its step): the engine's own, when it clips."""
        if self.clips_itself:
            self.structured.clip(self.ecfg.grad_clip)

    def synchronize(self) -> None:
        """Every rank's learnable tensors and optimizer state the same again (rows kept on their owners sent
        to the others); all ranks call it before anything reads them whole."""
        if self.structured is not None:
            self.structured.synchronize(self.optimizer)

    def apply_optimizer_settings(self) -> None:
        """Set this run's momentum and weight decay on the optimizer (a restored one keeps the saved ones)."""
        for group in self.optimizer.param_groups:
            if "momentum" in group:
                group["momentum"] = self.optim_cfg.momentum
            group["weight_decay"] = self.optim_cfg.weight_decay

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def settings(self) -> Dict:
        """What a training checkpoint's optimizer state depends on; resuming must match it."""
        return {"zero_stage": self.ecfg.zero_stage, "grad_accum_steps": self.ecfg.grad_accum_steps,
                "optimizer": self.optim_cfg.name, "official_steps": self.k}

    def describe(self) -> Dict:
        """The engine's settings and the DeepSpeed config it was built with, as plain values."""
        return {**self.settings(), "deepspeed": self.ds_config}

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers (the frozen backbone outlives this engine)."""
        self.engine.destroy()

    @property
    def module(self):
        return self.engine.module

    def num_learnable(self) -> int:
        """Elements of the learnable tensors (their full size, also when ZeRO-3 partitions them)."""
        return sum(full_numel(p) for p in self.model.learnable_parameters().values())

    def learnable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full (gathered) learnable tensors on CPU, identical on every rank."""
        self.synchronize()
        params = self.model.learnable_parameters()
        if not self.zero3:
            return {n: p.detach().cpu().clone() for n, p in params.items()}
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in params.items()}

    def save(self, folder: Path, tag: str) -> None:
        """DeepSpeed checkpoint (learnable module state, optimizer) into ``folder/tag``; all ranks call it."""
        self.synchronize()
        extra = {} if self.loss_scale is None else {"loss_scale": self.loss_scale.state_dict()}
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False, client_state=extra,
                                    exclude_frozen_parameters=True)

    def load(self, folder: Path, tag: str) -> bool:
        """Load DeepSpeed's part of ``folder/tag``; whether DeepSpeed found it."""
        path, extra = self.engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is not None and self.loss_scale is not None and (extra or {}).get("loss_scale"):
            self.loss_scale.load_state_dict(extra["loss_scale"])
        return path is not None


def engine_collective_slots() -> list:
    """``(object, attribute)`` pairs where DeepSpeed's torch backend keeps collectives it took from
    torch.distributed at start-up (ZeRO's all-gathers and reduce-scatters call these): for the profiler's
    communication timing, which wraps the others on torch.distributed itself."""
    comm = sys.modules.get("deepspeed.comm.comm")
    backend = getattr(comm, "cdb", None)
    return [(backend, name) for name in ("all_gather_function", "reduce_scatter_function")
            if backend is not None and callable(getattr(backend, name, None))]


def full_numel(p: torch.Tensor) -> int:
    """A parameter's full element count, also when ZeRO-3 partitions it (its local tensor is then empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


def partitions_its_module(ecfg: EngineConfig) -> bool:
    """A ZeRO-3 engine partitions and hooks the module it wraps for good: the next engine needs a fresh one."""
    return ecfg.zero_stage == 3


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitioned (gathered collectively inside every forward)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def memory_report(model) -> Dict[str, float]:
    """Per-rank bytes of frozen and learnable parameters held locally (ZeRO-3: this rank's partition),
    and peak accelerator memory where there is one (peak RSS on CPU)."""
    frozen = learnable = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p
        size = local.numel() * local.element_size()
        if p.requires_grad:
            learnable += size
        else:
            frozen += size
    out = {"frozen_param_bytes": float(frozen), "learnable_param_bytes": float(learnable)}
    if model.backbone.device.type == "cuda":
        out["peak_allocated_bytes"] = float(torch.cuda.max_memory_allocated())
    else:
        import resource
        out["peak_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out
