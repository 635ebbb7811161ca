"""Configs from YAML files and dotted ``key=value`` overrides; the YAML and ``--list`` views of a config."""

from __future__ import annotations

import dataclasses
import os
import textwrap
import typing
from pathlib import Path
from typing import Any

import yaml

from kcd_ray.config.build import build, import_plugins, to_dict, type_name
from kcd_ray.config.fields import OpenSection, is_extensions, registered_sections
from kcd_ray.config.schema import Config
from kcd_ray.errors import ConfigError


def parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides take the form dotted.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[parts[-1]] = parse_scalar(text)
    return data


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """A YAML file whose top level is a mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Build a Config from an optional YAML file plus dotted overrides; validated at once. An error names its
    source: the file for a bad value in it, "command-line override" for a bad override."""
    data: dict = dict(base or {})
    if path:
        data = merge(data, read_yaml_mapping(path, "config file"))
        try:
            import_plugins(data)
            build(Config, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if not overrides:
        import_plugins(data)
        return build(Config, data)
    apply_overrides(data, list(overrides))
    try:
        import_plugins(data)
        return build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"command-line override {e}" if path or base is not None else str(e)) from None


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field, registered sub-sections included: ``config --list``."""
    rows = []
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        if is_extensions(f):
            for name, sub in registered_sections(cls.parts).items():
                rows += describe(sub, f"{prefix}{name}.")
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, type_name(tp), getattr(inst, f.name), f.metadata.get("help", "")))
    return rows


def format_described(rows, width: int = 118) -> str:
    """``describe()``'s rows as aligned lines; long help wraps under the help column."""
    key_w = max(len(r[0]) for r in rows)
    lines = []
    for key, tp, default, help_ in rows:
        head = f"{key:{key_w}s}  {tp:10s} {default!r:>16}  "
        wrapped = textwrap.wrap(help_, max(30, width - len(head))) or [""]
        lines.append(head + wrapped[0])
        lines += [" " * len(head) + w for w in wrapped[1:]]
    return "\n".join(lines)


__all__ = ["OpenSection", "apply_overrides", "describe", "dump_yaml", "format_described", "load_config", "merge",
           "parse_scalar", "read_yaml_mapping"]
