"""Distillers (CE, KD and the RepDistiller family, all composable with KCD) and temperature schedules.

Registered methods (``distill.method``) and their default ``beta`` (``default_beta(name)``):

==============  ======  =========================================================  ==================
method          beta    what                                                       module
==============  ======  =========================================================  ==================
ce              --      cross-entropy only (teacher training, plain students)      logit_kd
kd              0       Hinton KD (gamma 0.1, alpha 0.9, T 4 in the recipe)         logit_kd
logit_match     1       squared error between (centred) logits                     logit_kd
dkd             1       decoupled KD (options dkd_alpha, dkd_beta, warmup)          logit_kd
fitnet          100     hint regression (option hint_layer)                        feature_maps
at              1000    attention transfer                                         feature_maps
nst             50      neuron selectivity transfer                                feature_maps
vid             1       variational information distillation                       feature_maps
kdsvd           1       KD with SVD                                                feature_maps
sp              3000    similarity preserving                                      relational
cc              0.02    correlation congruence                                     relational
rkd             1       relational KD                                              relational
pkt             30000   probabilistic knowledge transfer                           relational
ab              1       activation boundaries (init stage)                         staged
ft              200     factor transfer (init stage trains the paraphraser)        staged
fsp             50      flow of solution procedure (init stage)                    staged
crd             0.8     contrastive representation distillation (memory bank)      contrastive
hkd             3       holistic KD: instance graph + GNN + contrastive            holistic
mtkd            --      multi-teacher KD: mean of KD over distill.teachers        multi_teacher
ed              --      education distillation (curriculum.name=ed), docs/methods/ed.md §6      multi_teacher
==============  ======  =========================================================  ==================

Two options act across methods (docs/methods/rivals_logit.md): ``distill.logit_standardize`` (z-scored logits in
the KD term and dkd's, Sun et al. 2024) and ``distill.temperature.schedule=ctkd`` (a learned temperature, Li et al.
2023, bound to the distiller with ``Distiller.bind_temperature``).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from kcd_ray.config import ConfigError, DistillConfig
from kcd_ray.distill.base import DISTILLERS, Distiller, StepOutput, kd_kl, register_distiller
from kcd_ray.distill.temperature import TEMPERATURES, build_temperature

# Importing the method modules registers them.
from kcd_ray.distill import contrastive, feature_maps, holistic, logit_kd, multi_teacher, relational, staged  # noqa: E402,F401


def build_distiller(cfg: DistillConfig, student: nn.Module, teacher: Optional[nn.Module], num_classes: int,
                    **kwargs) -> Distiller:
    """The distiller named by ``cfg.method``.

    kwargs: ``image_size`` (default 32; the dummy forward that sizes connectors), ``in_channels`` (3),
    ``num_samples`` (CRD, HKD: the number of original training samples, i.e. the memory-bank rows;
    also ``distill.options.num_samples``).
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
