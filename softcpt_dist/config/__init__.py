"""Typed experiment configuration: the sections (``sections``, ``micro``), their field rules (``fields``)
and reading a run's config from YAML files and ``key=value`` overrides (``load``).

Everything a caller needs is importable from here: ``from softcpt_dist.config import Config, load_config``.
"""

from softcpt_dist.config.fields import ConfigError, choices, fraction, non_negative, one_of, positive, positive_list
from softcpt_dist.config.load import load_config, to_yaml, validate, validate_section
from softcpt_dist.config.micro import MicroGroupConfig, MicroPretrainConfig
from softcpt_dist.config.sections import (Config, DataConfig, EngineConfig, FeatureCacheConfig, KernelsConfig,
                                          MethodConfig, ModelConfig, OptimConfig, PromptConfig, SamplerConfig,
                                          SyntheticDataConfig, TextConfig, TrainConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "EngineConfig", "FeatureCacheConfig", "KernelsConfig",
           "MethodConfig", "MicroGroupConfig", "MicroPretrainConfig", "ModelConfig", "OptimConfig", "PromptConfig",
           "SamplerConfig", "SyntheticDataConfig", "TextConfig", "TrainConfig", "choices", "load_config",
           "fraction", "non_negative", "one_of", "positive", "positive_list", "to_yaml", "validate", "validate_section"]
