"""Epoch-indexed temperature schedules: ``build_temperature(cfg, epochs)(epoch) -> T``.

Epochs are 0-based; the schedule goes from ``T`` at epoch 0 to ``T_end`` at epoch ``epochs - 1`` and
stays there. Everything is a pure function of the epoch, so resumed runs see the same values.
"""

from __future__ import annotations

import math
from typing import Callable

from kcd_ray.config import ConfigError, TemperatureConfig
from kcd_ray.registry import Registry

TEMPERATURES: Registry = Registry("temperature schedule")

Schedule = Callable[[int], float]


def _progress(epoch: int, epochs: int) -> float:
    if epochs <= 1:
        return 1.0 if epoch > 0 else 0.0
    return min(max(epoch / (epochs - 1), 0.0), 1.0)


@TEMPERATURES.register("constant")
def constant(cfg: TemperatureConfig, epochs: int) -> Schedule:
    return lambda epoch: float(cfg.T)


@TEMPERATURES.register("linear")
def linear(cfg: TemperatureConfig, epochs: int) -> Schedule:
    return lambda epoch: float(cfg.T + (cfg.T_end - cfg.T) * _progress(epoch, epochs))


@TEMPERATURES.register("cosine")
def cosine(cfg: TemperatureConfig, epochs: int) -> Schedule:
    def f(epoch: int) -> float:
        return float(cfg.T_end + (cfg.T - cfg.T_end) * 0.5 * (1.0 + math.cos(math.pi * _progress(epoch, epochs))))

    return f


@TEMPERATURES.register("exponential")
def exponential(cfg: TemperatureConfig, epochs: int) -> Schedule:
    """Geometric interpolation: T * (T_end / T) ** progress."""
    return lambda epoch: float(cfg.T * (cfg.T_end / cfg.T) ** _progress(epoch, epochs))


@TEMPERATURES.register("step")
def step(cfg: TemperatureConfig, epochs: int) -> Schedule:
    """T before milestones[0], values[i] from milestones[i] on."""
    ms, vs = list(cfg.milestones), [float(v) for v in cfg.values]
    if not ms:
        raise ConfigError("distill.temperature.milestones: the step schedule needs at least one milestone")
    if len(ms) != len(vs):
        raise ConfigError(
            f"distill.temperature.values: expected one value per milestone "
            f"({len(ms)} milestones {ms}, got {len(vs)} values {vs})"
        )
    if any(b <= a for a, b in zip(ms, ms[1:])) or ms[0] < 0:
        raise ConfigError(f"distill.temperature.milestones: expected non-negative, strictly increasing epochs, got {ms}")
    if any(v <= 0 for v in vs):
        raise ConfigError(f"distill.temperature.values: temperatures must be > 0, got {vs}")

    def f(epoch: int) -> float:
        t = float(cfg.T)
        for m, v in zip(ms, vs):
            if epoch >= m:
                t = v
        return t

    return f


def build_temperature(cfg: TemperatureConfig, epochs: int) -> Schedule:
    """The schedule named by ``cfg.schedule`` over ``epochs`` training epochs."""
    if cfg.T <= 0 or cfg.T_end <= 0:
        raise ConfigError(f"distill.temperature.T/T_end: temperatures must be > 0, got {cfg.T} and {cfg.T_end}")
    if epochs < 1:
        raise ConfigError(f"optim.epochs: expected >= 1, got {epochs}")
    try:
        factory = TEMPERATURES.get(cfg.schedule)
    except KeyError as e:
        raise ConfigError(f"distill.temperature.schedule: {e.args[0]}") from None
    return factory(cfg, epochs)
