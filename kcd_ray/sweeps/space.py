"""Search spaces over config fields addressed by dotted path, validated against the typed config.

A space maps a dotted key to one of:

- a list                      grid values (shorthand for ``{grid: [...]}``)
- ``{grid: [...]}``           every value, crossed with the other grid keys
- ``{choice: [...]}``         one value drawn per sample
- ``{uniform: [lo, hi]}``     float drawn uniformly
- ``{loguniform: [lo, hi]}``  float drawn log-uniformly (lo > 0)
- ``{randint: [lo, hi]}``     integer in [lo, hi) (hi exclusive, as in ``ray.tune.randint``)

A key may name a leaf field (``kcd.rho``), a section (``distill.temperature``: each value is a
mapping merged into that section, so coupled parameters move together) or a key inside a free
mapping field (``distill.options.feat_dim``). Every value, and both ends of a range, is checked by
building the config with it, so a typo fails before any trial starts.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from kcd_ray.config import ConfigError, config_from_dict, field_kind

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_RANGE_KINDS = ("uniform", "loguniform", "randint")


@dataclasses.dataclass(frozen=True)
class Dim:
    key: str  # dotted config path
    kind: str  # one of KINDS
    values: tuple  # grid/choice values, or (lo, hi) for ranges (Ray Tune's sampling: ray_layer.tune.sweep)


def get_dotted(data: dict, key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """Set ``key`` in nested ``data`` in place; a mapping value for a section is merged into it."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        merged = dict(node[last])
        for k, v in value.items():
            set_dotted(merged, k, v)
        node[last] = merged
    else:
        node[last] = copy.deepcopy(value)
    return data


def apply_values(base: dict, values: dict) -> dict:
    """A deep copy of the nested config dict ``base`` with dotted ``values`` applied."""
    out = copy.deepcopy(base)
    for k, v in values.items():
        set_dotted(out, k, v)
    return out


def _parse_dim(key: str, spec: Any, where: str) -> Dim:
    if isinstance(spec, (list, tuple)):
        kind, values = "grid", list(spec)
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS + ("grid_search",):
        kind, values = next(iter(spec.items()))
        kind = "grid" if kind == "grid_search" else kind
        if not isinstance(values, (list, tuple)):
            raise ConfigError(f"{where}: space.{key}: {kind} takes a list, got {values!r}")
        values = list(values)
    else:
        raise ConfigError(
            f"{where}: space.{key}: expected a list of grid values or a one-key mapping "
            f"{{{'|'.join(KINDS)}: [...]}}, got {spec!r}"
        )
    if not values:
        raise ConfigError(f"{where}: space.{key}: {kind} needs at least one value")
    if kind in _RANGE_KINDS:
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}: space.{key}: {kind} takes [low, high] numbers, got {values!r}")
        lo, hi = values
        if not lo < hi:
            raise ConfigError(f"{where}: space.{key}: {kind} needs low < high, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: space.{key}: loguniform needs low > 0, got {lo}")
        if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise ConfigError(f"{where}: space.{key}: randint takes integers, got [{lo}, {hi}]")
    return Dim(key, kind, tuple(values))


def parse_space(space: Any, base: dict, where: str = "sweep") -> list[Dim]:
    """Parse and validate ``space`` against the resolved ``base`` config dict.

    ``where`` (the sweep file) is named in every error together with the offending key.
    """
    if space is None:
        return []
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: space: expected a mapping of dotted config keys, got {type(space).__name__}")
    dims = []
    for key, spec in space.items():
        key = str(key)
        try:
            kind = field_kind(key)
        except ConfigError as e:
            raise ConfigError(f"{where}: space.{e}") from None
        dim = _parse_dim(key, spec, where)
        # Ranges are checked at both ends, discrete values one by one.
        probes = dim.values
        if dim.kind in _RANGE_KINDS:
            probes = (dim.values[0], dim.values[1] - 1) if dim.kind == "randint" else dim.values
        for v in probes:
            if kind == "section" and not isinstance(v, dict):
                raise ConfigError(f"{where}: space.{key}: {key} is a config section; values must be mappings, "
                                  f"got {v!r}")
            try:
                config_from_dict(apply_values(base, {key: v}))
            except ConfigError as e:
                raise ConfigError(f"{where}: space.{key}: value {v!r} is invalid: {e}") from None
        dims.append(dim)
    return dims


def base_point(dims: list[Dim], base: dict) -> dict:
    """The base config's own value for every dimension (used for the plain-KD baseline trial)."""
    point = {}
    for d in dims:
        v = get_dotted(base, d.key)
        if isinstance(v, dict) and d.kind in ("grid", "choice") and isinstance(d.values[0], dict):
            # Sections: keep just the sub-keys the sweep varies.
            v = {k: get_dotted(v, k) for k in d.values[0]}
        point[d.key] = copy.deepcopy(v)
    return point


def grid_size(dims: list[Dim]) -> int:
    n = 1
    for d in dims:
        if d.kind == "grid":
            n *= len(d.values)
    return n
