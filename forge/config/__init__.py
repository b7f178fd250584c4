"""Typed job configuration: dataclasses, YAML files and dotted overrides.

`load_config("configs/x.yaml", ["model.n_layers=4", "optim.lr=3e-4"])` returns a validated, resolved
`JobConfig`. Precedence, lowest first: dataclass defaults < `model.preset` < YAML < overrides.
Every key is checked against the dataclass fields (unknown key -> error naming it), every value
against the field's type, and every section against its ranges (each section's `validate`: numbers
finite and in range, NaN and inf refused) and the model against itself (`ModelConfig.validate`),
before any work.

The package's modules, each read in one sitting: core (ConfigError, the range / choice checks, typed
construction from dicts, overrides), moe_quant (model.moe, model.quant), model (ModelConfig), run
(parallel, data, optim, train, log) and job (JobConfig, load_config, the YAML written back). Every
name is importable from `forge.config` itself.
"""
from forge.config.core import (ConfigError, _check_type, _is_number, _set_dotted, add_config_arguments,
                               build_dataclass, check_choices, check_range, config_arguments, flatten_dict,
                               merge_dicts, parse_overrides)
from forge.config.moe_quant import QUANT_POINTS, MoEConfig, QuantConfig
from forge.config.model import OUTPUT_SOFTMAX, ModelConfig
from forge.config.run import DataConfig, LogConfig, OptimConfig, ParallelConfig, TrainConfig
from forge.config.job import (JobConfig, config_from_dict, config_yaml, load_config, model_from_dict, save_config,
                              unused_keys)

__all__ = ["ConfigError", "_check_type", "_is_number", "_set_dotted", "add_config_arguments", "build_dataclass",
           "check_choices", "check_range", "config_arguments", "flatten_dict", "merge_dicts", "parse_overrides",
           "QUANT_POINTS", "MoEConfig", "QuantConfig", "OUTPUT_SOFTMAX", "ModelConfig",
           "DataConfig", "LogConfig", "OptimConfig", "ParallelConfig", "TrainConfig",
           "JobConfig", "config_from_dict", "config_yaml", "load_config", "model_from_dict", "save_config",
           "unused_keys"]
