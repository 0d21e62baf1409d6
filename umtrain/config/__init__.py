from umtrain.config.base import ConfigError
from umtrain.config.loader import apply_overrides, config_from_dict, dump_config, load_config
from umtrain.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    MemoryConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainingConfig,
)
from umtrain.config.validate import pipeline_chunk_of_layer

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "MemoryConfig", "ModelConfig",
    "MoEConfig", "OptimizerConfig", "ParallelConfig", "ScheduleConfig", "TrainingConfig", "apply_overrides",
    "config_from_dict", "dump_config", "load_config", "pipeline_chunk_of_layer",
]
