"""Configuration: a flat, validated YAML schema (:mod:`~semiseg.config.schema`, the method
sections in :mod:`~semiseg.config.methods`) and its loading (:mod:`~semiseg.config.load`).
Importing it needs pydantic and PyYAML, never torch."""

from semiseg.config.load import (apply_overrides, builtin_config_names, config_file, did_you_mean, known_keys,
                                 load_config, override_items, parse_override, save_config, suggest_key, validate)
from semiseg.config.methods import METHOD_SCHEMAS, method_schema, register_method_config
from semiseg.config.schema import (CHANGE_DATASETS, DATASETS, HEADS, Config, DataConfig, EvalConfig, MethodConfig,
                                   ModelConfig, Section, SyntheticConfig, TrainConfig)

__all__ = ["Config", "DataConfig", "EvalConfig", "MethodConfig", "ModelConfig", "Section", "SyntheticConfig",
           "TrainConfig", "DATASETS", "HEADS", "METHOD_SCHEMAS", "method_schema", "register_method_config",
           "load_config", "save_config", "validate", "parse_override", "apply_overrides", "override_items",
           "known_keys", "suggest_key", "did_you_mean", "builtin_config_names", "config_file"]
