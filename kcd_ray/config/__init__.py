"""Typed run configuration: dataclasses, loaded from YAML, overridden with dotted ``key=value``.

- ``schema``: the sections (one dataclass per top-level key) and their fields;
- ``fields``: how a field describes itself (``_f``) and sections registered parts extend (``OpenSection``);
- ``build``: coercion and checks (one-line ``ConfigError`` naming the dotted key), ``to_dict``;
- ``load``: YAML files, overrides, the YAML and ``--list`` views.
"""

from kcd_ray.config.build import config_digest, config_from_dict, field_kind, to_dict
from kcd_ray.config.fields import OpenSection, _f
from kcd_ray.config.load import (apply_overrides, describe, dump_yaml, format_described, load_config, merge,
                                 parse_scalar, read_yaml_mapping)
from kcd_ray.config.schema import (Config, CurriculumConfig, DataConfig, DistillConfig, KCDConfig, OptimConfig,
                                   RunConfig, ScalingConfig, SelectionConfig, SyntheticConfig, TemperatureConfig)
from kcd_ray.errors import ConfigError

__all__ = [
    "Config", "ConfigError", "CurriculumConfig", "DataConfig", "DistillConfig", "KCDConfig", "OpenSection",
    "OptimConfig", "RunConfig", "ScalingConfig", "SelectionConfig", "SyntheticConfig", "TemperatureConfig", "_f",
    "apply_overrides", "config_digest", "config_from_dict", "describe", "dump_yaml", "field_kind", "format_described",
    "load_config", "merge", "parse_scalar", "read_yaml_mapping", "to_dict",
]
