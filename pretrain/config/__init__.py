"""The run config: typed sections (schema.py), reading and writing (parse.py), checks of ranges,
between fields and of the machine (validate.py) and the reference docs (docs.py). These names are
its public API."""

from pretrain.config.docs import field_docs, reference_markdown
from pretrain.config.parse import load_config, load_config_dict, save_config, split_config_args, to_dict, to_yaml
from pretrain.config.schema import (
                                   CheckpointConfig,
                                   DataConfig,
                                   DiffusionConfig,
                                   LoggingConfig,
                                   OptimConfig,
                                   RunConfig,
                                   SamplingConfig,
                                   TrainConfig,
)
from pretrain.config.validate import check_machine, grad_accum_steps, validate
from pretrain.errors import ConfigError

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "DiffusionConfig", "LoggingConfig", "OptimConfig",
           "RunConfig", "SamplingConfig", "TrainConfig", "check_machine", "field_docs", "grad_accum_steps",
           "load_config", "load_config_dict", "reference_markdown", "save_config", "split_config_args", "to_dict",
           "to_yaml", "validate"]
