"""Reading a run's configuration: defaults <- YAML files (``_base_`` inheritance) <- ``key=value`` overrides.

One experiment is one YAML file (optionally inheriting others through ``_base_``) merged onto the
sections' defaults, then overridden from the command line with OmegaConf dot-lists. Unknown keys and
badly typed values are errors that name the key.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from softcpt_dist.config.fields import ConfigError
from softcpt_dist.config.sections import OFFICIAL_PRECISION_METHODS, Config
from softcpt_dist.config.signal_names import signal_number
from softcpt_dist.config.yaml_words import as_written, bool_word


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


@lru_cache(maxsize=1)
def _defaults() -> DictConfig:
    """The typed defaults, built once per process (``OmegaConf.merge`` copies its first argument, so
    every ``load_config`` starts from an untouched tree)."""
    return OmegaConf.structured(Config)


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults <- each YAML file in order <- ``key=value`` overrides, validated into a ``Config``."""
    nodes = []
    for f in files:
        try:
            nodes.append(_read_yaml(Path(f)))
        except OmegaConfBaseException as err:
            raise _config_error(err, f"{f}: ") from err
    try:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        dotlist = OmegaConf.from_dotlist([as_written(item, Config) for item in overrides])
        try:
            merged = OmegaConf.merge(_defaults(), *nodes, dotlist)  # one copy of the defaults, not one per layer
        except OmegaConfBaseException:
            merged = _merge_naming_the_file(files, nodes)  # which layer is wrong: the file's error, or below
            merged = OmegaConf.merge(merged, dotlist)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err, "") from err
    validate(cfg)
    return cfg


def _merge_naming_the_file(files: Sequence[str | Path], nodes: list) -> DictConfig:
    """The defaults merged with each file's tree in turn; a file that does not fit raises naming it."""
    merged = _defaults()
    for f, node in zip(files, nodes):
        try:
            merged = OmegaConf.merge(merged, node)
        except OmegaConfBaseException as err:
            raise _config_error(err, f"{f}: ") from err
    return merged


def _config_error(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0]
    return ConfigError(f"{where}bad config entry {key!r}: {reason}")


def validate_section(section, prefix: str) -> None:
    """Check a section's (and its subsections') declared choices and ranges; errors name ``prefix.key``."""
    for f in fields(section):
        key, value = f"{prefix}.{f.name}", getattr(section, f.name)
        if is_dataclass(value):
            validate_section(value, key)
            continue
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            value = bool_word(value, f.metadata["choices"])
            if value not in f.metadata["choices"]:
                raise ConfigError(f"{key}={value!r} is not one of {list(f.metadata['choices'])}")
            setattr(section, f.name, value)
        elif "length" in f.metadata:
            if len(value) != f.metadata["length"] or min(value) <= 0:
                raise ConfigError(f"{key} must be {f.metadata['length']} numbers > 0, got {list(value)}")
        elif f.metadata.get("positive") and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
        elif f.metadata.get("non_negative") and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
        elif f.metadata.get("fraction") and not 0 <= value <= 1:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")


def validate(cfg: Config) -> None:
    """Check choices and ranges that the type system cannot express, and rules across sections (a method's
    own rules are checked by its class, ``Method.check``, when a run starts)."""
    for f in fields(cfg):
        validate_section(getattr(cfg, f.name), f.name)
    if cfg.train.on_nonfinite == "skip" and cfg.engine.grad_accum_steps > 1:
        raise ConfigError("train.on_nonfinite=skip needs engine.grad_accum_steps=1 (a skipped micro-batch would "
                          "shift the accumulation boundaries)")
    for name in cfg.train.stop_signals:
        try:
            signal_number(name)
        except ValueError as err:
            raise ConfigError(f"train.stop_signals: {err}") from None
    stage = ((cfg.engine.deepspeed or {}).get("zero_optimization") or {}).get("stage")
    if stage is not None and stage != cfg.engine.zero_stage:
        raise ConfigError(f"engine.deepspeed.zero_optimization.stage={stage}: set the ZeRO stage with engine.zero_stage "
                          f"(it is {cfg.engine.zero_stage}), which the engine's buckets, partitioned backbones, "
                          "method checks and checkpoints follow")
    if cfg.model.precision in ("official_fp16", "official_amp"):
        _check_official_precision(cfg)
    if cfg.train.resume and not cfg.train.run_name:
        raise ConfigError("train.resume needs train.run_name: the run folder to resume in (the default name has a "
                          "timestamp)")


def _check_official_precision(cfg: Config) -> None:
    """``model.precision=official_fp16`` / ``official_amp`` are the official SoftCPT code's PREC=fp16 / amp:
    its methods (SoftCPT and CoOp), its meta network (one linear layer), its optimizer applied as it is (ZeRO
    1-3 would keep fp32 master copies or partition the step that loss scaling skips) and no other loss scaling
    or master weights (a DeepSpeed fp16/bf16 section would add them)."""
    mode = cfg.model.precision.replace("official_", "")
    where = f"model.precision={cfg.model.precision} (the official code's PREC={mode})"
    if cfg.method.name not in OFFICIAL_PRECISION_METHODS:
        raise ConfigError(f"{where} is defined for method.name=softcpt and coop (the official SoftCPT code's "
                          f"trainers; and zeroshot), not method.name={cfg.method.name}: use model.precision=fp16")
    if cfg.method.name == "softcpt" and cfg.method.meta_net != "lin":
        raise ConfigError(f"{where} needs method.meta_net=lin (the official prompt generator), not "
                          f"{cfg.method.meta_net}")
    if cfg.engine.zero_stage != 0:
        raise ConfigError(f"{where} applies the optimizer to the contexts as they are, on ZeRO-0: "
                          f"engine.zero_stage={cfg.engine.zero_stage} would wrap it; use engine.zero_stage=0")
    for key in ("fp16", "bf16", "amp"):
        if ((cfg.engine.deepspeed or {}).get(key) or {}).get("enabled"):
            raise ConfigError(f"{where} has no loss scaling or master weights: remove engine.deepspeed.{key}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
