"""Typed, layered configuration: schema, YAML loading, overrides, derived values, validation."""
from .errors import ConfigError
from .loader import CONFIGS_DIR, config_from_dict, load_config, load_config_args
from .schema import Config, to_dict

__all__ = ["CONFIGS_DIR", "Config", "ConfigError", "config_from_dict", "load_config", "load_config_args", "to_dict"]
