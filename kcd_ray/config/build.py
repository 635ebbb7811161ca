"""Building a typed config from plain data: coercion, checks, and the way back (``to_dict``).

Every field is checked when the config is built: an unknown key, a value of the wrong type, a value out of
range or a name that is not registered fails at once with a one-line ``ConfigError`` naming the dotted key and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import typing
from typing import Any

from kcd_ray.config.fields import OpenSection, extension_class, is_extensions
from kcd_ray.config.schema import Config
from kcd_ray.errors import ConfigError
from kcd_ray.registry import registry_accepts, registry_names

OFF_ON_KEYS = {"distill.cache"}  # string fields with an "off" choice (YAML 1.1 reads a bare `off` as false)


def type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return build(tp, value, key + ".")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(value, tp, key)


def _scalar(value: Any, tp, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return _float(value, key)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool) and key in OFF_ON_KEYS:
            return "on" if value else "off"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _float(value: Any, key: str) -> float:
    """Every form Python's ``float()`` reads ("1e-4", "5E-4", ".5", 2), and only finite values.

    YAML 1.1 (PyYAML) loads ``1e-4`` as the string '1e-4' (no dot), so strings are parsed here too."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


_BOUNDS = (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"), ("le", float.__le__, "<="), ("lt", float.__lt__, "<"))


def _check(value: Any, f: dataclasses.Field, key: str) -> None:
    m = f.metadata
    if value is None:
        return
    choices = m.get("choices")
    if choices is not None and not (value == "" and f.default == ""):  # "" where it is the default: unset
        for item in value if isinstance(value, list) else [value]:  # a list field: every item is a choice
            _check_choice(item, choices, key)
    for bound, op, word in _BOUNDS:
        b = m.get(bound)
        if b is not None and isinstance(value, (int, float)) and not op(float(value), float(b)):
            raise ConfigError(f"{key}: {value!r} is out of range; expected {word} {b}")


def _check_choice(item: Any, choices, key: str) -> None:
    if isinstance(choices, str):  # a registry: its names, or a form it is open to (models: torchvision/<name>)
        ok, hint = registry_accepts(choices, item) if isinstance(item, str) else (False, "")
        if not ok:
            raise ConfigError(f"{key}: {item!r} is not one of: {', '.join(registry_names(choices))}"
                              + (f"; or {hint}" if hint else ""))
    elif item not in choices:
        raise ConfigError(f"{key}: {item!r} is not one of: {', '.join(map(str, choices))}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not is_extensions(f)}


def build(cls, data: dict, prefix: str = ""):
    """An instance of the config dataclass ``cls`` from a mapping; unknown keys and bad values raise
    ``ConfigError`` naming the dotted key. An open section also takes its registered parts' sub-sections."""
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    extensions = {}
    for k in data:
        if k in fields:
            continue
        ext = extension_class(cls, k) if issubclass(cls, OpenSection) else None
        if ext is None:
            allowed = list(fields) + (sorted(_registered(cls)) if issubclass(cls, OpenSection) else [])
            raise ConfigError(f"{prefix}{k}: unknown key; allowed: {', '.join(allowed)}")
        extensions[k] = _coerce(data[k], ext, prefix + k)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            v = _coerce(data[name], hints[name], prefix + name)
            _check(v, f, prefix + name)
            kwargs[name] = v
    if issubclass(cls, OpenSection):
        kwargs["extensions"] = {**{n: c() for n, c in _registered(cls).items()}, **extensions}
    return cls(**kwargs)


def _registered(cls) -> dict[str, type]:
    from kcd_ray.config.fields import registered_sections

    return registered_sections(cls.parts)


def import_plugins(data: dict) -> None:
    """Import ``run.plugins`` (a user's registered parts) before the config that names them is checked."""
    plugins = (data.get("run") or {}).get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError(f"run.plugins: expected a list of module names, got {plugins!r}")
    for name in plugins:
        try:
            importlib.import_module(str(name))
        except Exception as e:  # noqa: BLE001 - any import failure is the user's module: name it
            raise ConfigError(f"run.plugins: module {name!r} does not import ({type(e).__name__}: {e})") from None


def config_from_dict(data: dict) -> Config:
    import_plugins(data)
    return build(Config, data)


def to_dict(obj) -> Any:
    """A config (or section) as plain nested data; an open section's parts sit beside its own fields."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if is_extensions(f):
                out.update({k: to_dict(v) for k, v in value.items()})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_kind(key: str) -> str:
    """'leaf', 'section' or 'free' (inside a dict-typed field) for a dotted config key; ConfigError if unknown.

    Sweeps check their space's keys with it; an open section's registered sub-sections count as sections."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            return "free"  # a free mapping (e.g. distill.options): any sub-key is allowed
        fields = _fields(cls)
        ext = extension_class(cls, part) if issubclass(cls, OpenSection) else None
        if part not in fields and ext is None:
            where = ".".join(parts[:i]) or "the config"
            allowed = ", ".join(list(fields) + (sorted(_registered(cls)) if issubclass(cls, OpenSection) else []))
            raise ConfigError(f"{key}: unknown config key ({part!r} is not a field of {where}; allowed: {allowed})")
        cls = ext if ext is not None else typing.get_type_hints(cls)[part]
        if (cls is dict or typing.get_origin(cls) is dict) and i < len(parts) - 1:
            return "free"
    return "section" if dataclasses.is_dataclass(cls) else "leaf"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not (prefix + k).endswith(".options"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_digest(cfg) -> str:
    """8 hex digits of the config's values that differ from the defaults, ``run.*`` left out (storage, verbosity,
    failures never change the experiment): what a derived run name carries. Values at their defaults are left
    out, so a kcd_ray version that adds a field (with its default) names the same experiment the same way."""
    d, defaults = _flat(to_dict(cfg)), _flat(to_dict(Config()))
    changed = {k: v for k, v in d.items() if not k.startswith("run.") and defaults.get(k, object()) != v}
    return hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
