"""Temperature schedules: ``build_temperature(cfg, epochs)`` -> an epoch-indexed schedule or a learned temperature.

Epochs are 0-based; the fixed schedules go from ``T`` at epoch 0 to ``T_end`` at epoch ``epochs - 1`` and stay
there. They are pure functions of the epoch, so resumed runs see the same values.

``ctkd`` (Curriculum Temperature KD, Li et al., AAAI 2023) is a :class:`LearnedTemperature` instead: an
``nn.Module`` whose parameter the optimiser trains. ``Distiller.bind_temperature`` makes it a submodule of the
distiller (so it is trained with the student, synchronised by DDP, checkpointed and resumed with it) and hands the
engine its ``epoch -> float`` view (:meth:`LearnedTemperature.schedule`: the current value), which the engine,
KCD's values and the metrics row read like any schedule; each step's losses use the module's output itself
(``Distiller.step_temperature``), through which the KD loss's gradient reaches the parameter.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import nn

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
        raise ConfigError("distill.temperature.milestones: expected non-negative, strictly increasing epochs, "
                          f"got {ms}")
    if any(v <= 0 for v in vs):
        raise ConfigError(f"distill.temperature.values: temperatures must be > 0, got {vs}")

    def f(epoch: int) -> float:
        t = float(cfg.T)
        for m, v in zip(ms, vs):
            if epoch >= m:
                t = v
        return t

    return f


class LearnedTemperature(nn.Module):
    """A temperature the optimiser trains: ``forward(epoch)`` is the 0-dim tensor a step's losses use (gradients
    flow into the module), :meth:`value` its current value as a float, :meth:`schedule` the engine's view."""

    def value(self) -> float:
        with torch.no_grad():
            return float(self(0).detach())

    def schedule(self, epoch: int) -> float:
        return self.value()


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-lam`` (Ganin & Lempitsky 2015). CTKD's
    ``GradientReversalFunction`` (github.com/zhengli97/CTKD, models/temp_global.py) multiplies by its lambda, which
    its schedule makes run from 0 to -1; here lam runs from 0 to 1 and the sign is in the layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = float(lam)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    return _GradientReversal.apply(x, lam)


def ctkd_lambda(epoch: int, start: float, end: float, ramp_epochs: int) -> float:
    """CTKD's reversal strength at 0-based ``epoch``: a cosine ramp from ``start`` to ``end`` over ``ramp_epochs``.

    The reference's ``CosineDecay(max_value=-start, min_value=-end, num_loops=ramp_epochs).get_value(e)`` (CTKD
    train_student.py), negated; it is called with the 1-based epoch e = epoch + 1, so the first epoch already has
    ``(1 - cos(pi / ramp)) / 2`` of the ramp."""
    if ramp_epochs <= 0:
        return float(end)
    i = min(max(int(epoch) + 1, 0), int(ramp_epochs))
    return float(start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * i / ramp_epochs)))


class CurriculumTemperature(LearnedTemperature):
    """CTKD's global temperature: ``T = T_min + T_span * sigmoid(GRL_lambda(theta))``, one learned scalar.

    As github.com/zhengli97/CTKD (models/temp_global.py ``Global_T``, helper/loops.py ``train_distill``): theta starts
    at 1 (``torch.ones(1)``), ``T = t_start + t_end * sigmoid(theta)`` with ``--t_start 1 --t_end 20`` (T in (1, 21),
    15.6 at the start; no other clamp), the gradient reversal layer makes theta ascend the KD loss the student
    descends, with strength lambda from :func:`ctkd_lambda`; theta is trained by the student's optimiser (its SGD,
    learning rate schedule and weight decay: ``trainable_list`` there)."""

    def __init__(self, cfg: TemperatureConfig):
        super().__init__()
        self.T_min, self.T_span = float(cfg.ctkd_T_min), float(cfg.ctkd_T_span)
        self.lambda_start, self.lambda_end = float(cfg.ctkd_lambda_start), float(cfg.ctkd_lambda_end)
        self.ramp_epochs = int(cfg.ctkd_ramp_epochs)
        self.theta = nn.Parameter(torch.tensor(float(cfg.ctkd_init)))

    def lam(self, epoch: int) -> float:
        return ctkd_lambda(epoch, self.lambda_start, self.lambda_end, self.ramp_epochs)

    def forward(self, epoch: int) -> torch.Tensor:
        return self.T_min + self.T_span * torch.sigmoid(reverse_gradient(self.theta, self.lam(epoch)))


@TEMPERATURES.register("ctkd")
def ctkd(cfg: TemperatureConfig, epochs: int) -> LearnedTemperature:
    return CurriculumTemperature(cfg)


def build_temperature(cfg: TemperatureConfig, epochs: int) -> Union[Schedule, LearnedTemperature]:
    """The schedule named by ``cfg.schedule`` over ``epochs`` training epochs (``ctkd``: a learned temperature, which
    a distiller binds with ``Distiller.bind_temperature`` before the optimiser is built)."""
    if cfg.T <= 0 or cfg.T_end <= 0:
        raise ConfigError(f"distill.temperature.T/T_end: temperatures must be > 0, got {cfg.T} and {cfg.T_end}")
    if epochs < 1:
        raise ConfigError(f"optim.epochs: expected >= 1, got {epochs}")
    try:
        factory = TEMPERATURES.get(cfg.schedule)
    except KeyError as e:
        raise ConfigError(f"distill.temperature.schedule: {e.args[0]}") from None
    return factory(cfg, epochs)


def is_learned(cfg: TemperatureConfig) -> bool:
    """Whether ``cfg.schedule`` is a learned temperature (ctkd), whose values only the bound distiller knows."""
    return isinstance(build_temperature(cfg, 1), LearnedTemperature)


def epoch_temperature(cfg: TemperatureConfig, epochs: int, epoch: int) -> float:
    """T at ``epoch`` for code without the run's distiller (the offline E-step's scorers): a fixed schedule's value;
    for a learned temperature its initial value, which only value functions that ignore T may see (KCD refuses
    ``kcd.value_fn=kd`` with an offline E-step and ctkd unless ``kcd.value_T`` is set)."""
    t = build_temperature(cfg, epochs)
    return t.value() if isinstance(t, LearnedTemperature) else float(t(epoch))
