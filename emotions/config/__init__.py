"""Typed training configuration: frozen pydantic dataclasses, YAML presets, checked ``key=value`` overrides.

A config is built from a preset (``emotions/presets/NAME.yaml``), then an optional user file
(YAML or JSON), then ``section.key=value`` overrides, in that order. The field types say what
each key accepts (choices, bounds); every unknown key and every bad value is reported at once, by
its dotted name, in one ConfigError before any cluster time is spent. The classes validate on every
construction, ``dataclasses.replace`` included.

    schema.py   the sections (TrainConfig and its parts), their key types and cross-key checks
    loading.py  presets, files, overrides, merging, validation and its error messages
    hashing.py  the digest a resume is checked against, and the changes that refuse it
"""

from emotions.config.hashing import RESUMABLE_KEYS, config_changes, config_hash, flatten
from emotions.config.loading import (
    PRESETS_DIR,
    build_config,
    describe_errors,
    from_dict,
    load_file,
    load_preset,
    merge,
    parse_overrides,
    preset_names,
    validate,
)
from emotions.config.schema import (
    AUTO,
    RUN_NAME,
    SETTINGS,
    Bool,
    BoolOrAuto,
    ConfigError,
    DataConfig,
    Float,
    Fraction,
    Int,
    IntOrAuto,
    ModelConfig,
    Probability,
    Problems,
    RunSettings,
    ScalingSettings,
    StageConfig,
    Str,
    ThresholdConfig,
    TrainConfig,
)

__all__ = [
    "AUTO",
    "PRESETS_DIR",
    "RESUMABLE_KEYS",
    "RUN_NAME",
    "SETTINGS",
    "Bool",
    "BoolOrAuto",
    "ConfigError",
    "DataConfig",
    "Float",
    "Fraction",
    "Int",
    "IntOrAuto",
    "ModelConfig",
    "Probability",
    "Problems",
    "RunSettings",
    "ScalingSettings",
    "StageConfig",
    "Str",
    "ThresholdConfig",
    "TrainConfig",
    "build_config",
    "config_changes",
    "config_hash",
    "describe_errors",
    "flatten",
    "from_dict",
    "load_file",
    "load_preset",
    "merge",
    "parse_overrides",
    "preset_names",
    "validate",
]
