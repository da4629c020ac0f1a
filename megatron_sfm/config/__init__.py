"""Typed run configuration: dataclasses, YAML loading, ``key=value`` overrides, presets.

``load_config(path, overrides)`` returns a validated :class:`RunConfig`; every error is a
:class:`megatron_sfm.errors.ConfigError` naming the key.
"""

from megatron_sfm.config.schema import (
    CheckpointConfig,
    DataConfig,
    FP8Config,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
)
from megatron_sfm.config.loader import (
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    apply_overrides,
)
from megatron_sfm.config.presets import PRESETS, model_preset
from megatron_sfm.config.validate import validate_run_config

__all__ = [
    "CheckpointConfig", "DataConfig", "FP8Config", "LoggingConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "RunConfig", "TrainingConfig",
    "config_from_dict", "config_to_dict", "dump_config", "load_config", "apply_overrides",
    "PRESETS", "model_preset", "validate_run_config",
]
