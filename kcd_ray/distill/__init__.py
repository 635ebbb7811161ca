"""Distillers (CE, KD and the RepDistiller family, all composable with KCD) and temperature schedules."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from kcd_ray.config import ConfigError, DistillConfig
from kcd_ray.distill.base import DISTILLERS, Distiller, StepOutput, kd_kl, register_distiller
from kcd_ray.distill.temperature import TEMPERATURES, build_temperature

# Importing the method modules registers them.
from kcd_ray.distill import contrastive, feature_maps, holistic, logit_kd, relational, staged  # noqa: E402,F401


def build_distiller(cfg: DistillConfig, student: nn.Module, teacher: Optional[nn.Module], num_classes: int,
                    **kwargs) -> Distiller:
    """The distiller named by ``cfg.method``.

    kwargs: ``image_size`` (default 32; the dummy forward that sizes connectors), ``in_channels`` (3),
    ``num_samples`` (CRD: the number of original training samples; also ``distill.options.num_samples``).
    """
    try:
        cls = DISTILLERS.get(cfg.method)
    except KeyError as e:
        raise ConfigError(f"distill.method: {e.args[0]}") from None
    return cls(student, teacher, cfg, num_classes, **kwargs)


def default_beta(name: str) -> float:
    """The weight of method ``name``'s own term when ``distill.beta`` is left unset."""
    return float(DISTILLERS.get(name).default_beta)


__all__ = [
    "DISTILLERS", "Distiller", "StepOutput", "TEMPERATURES", "build_distiller", "build_temperature",
    "default_beta", "kd_kl", "register_distiller",
]
