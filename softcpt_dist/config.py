"""Typed experiment configuration: dataclasses + YAML files + ``key=value`` overrides.

One experiment is one YAML file (optionally inheriting others through ``_base_``) merged onto the
defaults below, then overridden from the command line with OmegaConf dot-lists. Unknown keys and
badly typed values are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclass
class ModelConfig:
    arch: str = "softcpt-tiny"  # any open_clip architecture name, e.g. RN50, ViT-B-16, ViT-L-14
    # open_clip pretrained tag (e.g. "openai"), a local weights file, or null for random init.
    pretrained: Optional[str] = None
    precision: str = "fp32"  # fp32 | bf16 | fp16 (frozen CLIP weights; learnable tensors stay fp32)
    device: str = "cpu"
    cache_dir: Optional[str] = None  # where open_clip looks for / stores tagged weights
    # null: QuickGELU when loading OpenAI's original checkpoints, else the architecture's default.
    quick_gelu: Optional[bool] = None


@dataclass
class PromptConfig:
    n_ctx: int = 16  # N: context vectors per class prompt
    n_task_ctx: int = 4  # M: learnable task-context vectors in the task prompt (official runs: 4)
    n_class_ctx: int = 4  # K: learnable class-context vectors of the class-aware variants
    class_token_position: str = "end"  # end | middle | front (CoOp)
    init_std: float = 0.02  # std of the normal init of every learnable context


@dataclass
class MethodConfig:
    name: str = "softcpt"  # softcpt | coop | zeroshot | linear_probe
    variant: str = "NATA"  # softcpt: NATA | NATS | CATA | CSTA | CATS | CSTS
    meta_net: str = "lin"  # lin (paper: bias-free linear) | mlp (extension, not in the paper)
    meta_hidden: int = 512  # hidden width of the mlp meta network
    coop_mode: str = "CA"  # coop: CA (one context per task) | CS (per class) | MT (one for all tasks)
    # Linear probe: inverse L2 strengths searched on the validation split (CoOp's lpclip grid).
    lp_c_grid: List[float] = field(default_factory=lambda: [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6])
    lp_search_steps: int = 8  # log-scale refinement steps around the best grid value
    lp_max_iter: int = 1000


@dataclass
class SyntheticDataConfig:
    train_per_class: int = 24
    val_per_class: int = 4
    test_per_class: int = 12
    image_size: int = 64
    seed: int = 0


@dataclass
class SamplerConfig:
    mode: str = "union"  # union (paper: uniform over all samples) | balanced | temperature
    temperature: float = 2.0  # temperature mode: task probability proportional to n_t ** (1/T)
    tasks_per_batch: int = 0  # > 0: each micro-batch holds samples of at most this many tasks


@dataclass
class FeatureCacheConfig:
    enabled: bool = False  # precompute frozen image features; training/eval skip the image encoder
    dir: str = "cache/features"  # shared by runs; entries are keyed by model, weights and preprocessing
    train_views: int = 0  # augmented views per training image to cache (0: training reads images)
    batch_size: int = 128


@dataclass
class DataConfig:
    # synthetic | task_folders | general10 | plant6 | fashion20 | split_dk | custom (see softcpt_dist.data)
    dataset: str = "synthetic"
    root: str = "data/synthetic"
    group_file: Optional[str] = None  # custom: YAML task group; split_dk: the split_dk_*.json file
    split_format: str = "auto"  # general10/plant6: auto (split_dk if present, else split_zhou) | split_dk | split_zhou
    tasks: Optional[List[str]] = None  # keep only these tasks (keys or names), in this order
    shots: int = 16  # K images per class from train (0 = all); validation keeps min(K, 4)
    fewshot_seed: Optional[int] = None  # null: train.seed
    train_augment: str = "paper"  # paper (random resized crop 0.08-1, bicubic, flip) | none
    num_workers: int = 0
    skip_bad_images: bool = False  # true: decode every used image first, drop and report unreadable ones
    generate_if_missing: bool = True  # built-in synthetic data only
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 50
    batch_size: int = 32
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: int = 1
    warmup_type: str = "constant"  # constant | linear
    warmup_lr: float = 1e-5
    # Reproduce the official code: its optimizer and scheduler are registered once per module
    # name and stepped once per name (3 per iteration for NA variants, 4 for CA/CS).
    official_stepping: bool = False


@dataclass
class EngineConfig:
    """DeepSpeed engine. ``optim.batch_size`` is the global batch: each rank's micro-batch is
    ``batch_size / (world_size * grad_accum_steps)``, so results do not depend on the world size."""

    zero_stage: int = 0  # 0 | 1 | 2 | 3 (3 partitions the frozen CLIP weights across ranks too)
    grad_accum_steps: int = 1
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    activation_checkpointing: bool = False  # recompute text-encoder blocks in backward (exact)
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | nccl | gloo
    timeout_s: float = 300.0  # bound on every collective: a dead rank makes the others exit
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config keys, merged last


@dataclass
class TrainConfig:
    seed: int = 1
    mode: str = "auto"  # auto | joint | per_task (auto: per_task for CoOp CA/CS, else joint)
    task_weights: Optional[Dict[str, float]] = None  # per-task loss weights by task name
    log_every: int = 10  # iterations between log lines
    eval_batch_size: int = 100
    eval_split: str = "test"
    output_dir: str = "runs"
    run_name: Optional[str] = None  # null: <method>-<variant>-<timestamp>
    deterministic: bool = True
    progress: bool = True  # tqdm bars on interactive terminals
    resume: Optional[str] = None  # null | latest (this run folder's newest checkpoint) | a checkpoint folder
    checkpoint_every: int = 0  # steps between training checkpoints (0: at the end of every epoch only)
    keep_checkpoints: int = 2  # newest N training checkpoints kept
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss does


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


_CHOICES = {
    "model.precision": ("fp32", "bf16", "fp16"),
    "prompt.class_token_position": ("end", "middle", "front"),
    "method.name": ("softcpt", "coop", "zeroshot", "linear_probe"),
    "method.variant": ("NATA", "NATS", "CATA", "CSTA", "CATS", "CSTS"),
    "method.meta_net": ("lin", "mlp"),
    "method.coop_mode": ("CA", "CS", "MT"),
    "data.train_augment": ("paper", "none"),
    "data.sampler.mode": ("union", "balanced", "temperature"),
    "data.split_format": ("auto", "split_dk", "split_zhou"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "constant"),
    "optim.warmup_type": ("constant", "linear"),
    "train.mode": ("auto", "joint", "per_task"),
    "train.eval_split": ("val", "test"),
    "train.on_nonfinite": ("stop", "skip"),
    "engine.zero_stage": (0, 1, 2, 3),
    "engine.backend": ("auto", "nccl", "gloo"),
}
_POSITIVE = ("prompt.n_ctx", "optim.batch_size", "optim.epochs", "train.eval_batch_size", "train.log_every",
             "data.sampler.temperature", "data.cache.batch_size", "engine.grad_accum_steps", "engine.timeout_s",
             "train.keep_checkpoints")
_NON_NEGATIVE = ("prompt.n_task_ctx", "prompt.n_class_ctx", "data.shots", "optim.warmup_epochs", "optim.lr",
                 "data.sampler.tasks_per_batch", "data.cache.train_views", "engine.grad_clip",
                 "train.checkpoint_every")


def _read_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    """Read one YAML file, merging the files named by its ``_base_`` key underneath it."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config inheritance cycle through {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"cannot parse config file {path}: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    bases = node.pop("_base_", None)
    if bases is None:
        return node
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / base, seen + (path,)))
    return OmegaConf.merge(merged, node)


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults <- each YAML file in order <- ``key=value`` overrides, validated into a ``Config``."""
    merged = OmegaConf.structured(Config)
    for f in files:
        try:
            merged = OmegaConf.merge(merged, _read_yaml(Path(f)))
        except OmegaConfBaseException as err:
            raise _config_error(err, f"{f}: ") from err
    try:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err, "") from err
    validate(cfg)
    return cfg


def _config_error(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0]
    return ConfigError(f"{where}bad config entry {key!r}: {reason}")


def validate(cfg: Config) -> None:
    """Check choices and ranges that the type system cannot express."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)}")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)}")
    if cfg.train.on_nonfinite == "skip" and cfg.engine.grad_accum_steps > 1:
        raise ConfigError("train.on_nonfinite=skip needs engine.grad_accum_steps=1 (a skipped micro-batch would "
                          "shift the accumulation boundaries)")
    if cfg.train.resume and not cfg.train.run_name:
        raise ConfigError("train.resume needs train.run_name: the run folder to resume in (the default name has a "
                          "timestamp)")
    if cfg.method.name == "softcpt" and cfg.method.variant[:2] in ("CA", "CS") and cfg.prompt.n_class_ctx == 0:
        raise ConfigError(f"method.variant={cfg.method.variant} needs prompt.n_class_ctx > 0")


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
