"""Configuration: the schema (dataclasses), YAML + override loading, and every validation rule."""

from liteppo_mcore.config.loader import (
    find_unknown_keys,
    load_config,
    suggest_key,
    to_dict,
    to_yaml,
    valid_key_paths,
    world_size_from_env,
)
from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.config.validate import ConfigError, validate

__all__ = [
    "ConfigError",
    "LitePPOConfig",
    "find_unknown_keys",
    "load_config",
    "suggest_key",
    "to_dict",
    "to_yaml",
    "valid_key_paths",
    "validate",
    "world_size_from_env",
]
