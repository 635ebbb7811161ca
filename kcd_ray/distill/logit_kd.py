"""Teacher-free training (``ce``) and logit-level distillers (``kd``, ``logit_match``, ``dkd``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kcd_ray.distill.connectors import f32
from kcd_ray.distill.base import Distiller, StepOutput, register_distiller, standardize_logits


@register_distiller("ce")
class CrossEntropy(Distiller):
    """Plain cross-entropy with weight 1 (teacher training, vanilla students); gamma/alpha/beta are
    ignored. A teacher may still be given: its logits are returned for KCD's teacher-based values."""

    needs_teacher = False

    def bind_temperature(self, temperature):
        """No KD term: a learned temperature is not trained here (teacher training with a ctkd config)."""
        return temperature.schedule if hasattr(temperature, "schedule") else temperature

    def forward(self, batch: dict, T: float, epoch: int, init_stage: bool = False) -> StepOutput:
        logits = self.student(batch["image"])
        _, t_logits = self.teacher_outputs_of(batch, features=False)
        ce = F.cross_entropy(f32(logits), batch["label"], reduction="none")
        return StepOutput(logits, {"ce": ce.mean()}, t_logits, {"ce": ce})


@register_distiller("kd")
class KD(Distiller):
    """Hinton KD: gamma * CE + alpha * T^2 * KL(p_t || p_s) (batch mean). The recipe: 0.1 / 0.9 / T=4. With
    ``distill.logit_standardize`` the KL is of the z-scored logits (the reference's recipe: 0.1 / 9 / T=2)."""

    default_beta = 0.0


@register_distiller("logit_match")
class LogitMatch(Distiller):
    """Squared error between logits, (1/(2C)) * ||z_s - z_t||^2 averaged over the batch: the T -> inf
    limit of T^2 * KD for zero-mean logits (Chen, Wang & Feng 2021). Option ``center`` (default
    true) subtracts each sample's logit mean first, which makes the equivalence hold exactly."""

    default_beta = 1.0
    known_options = ("center",)

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.center = self.opt("center", True, bool)

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        z_s, z_t = f32(s_logits), f32(t_logits)
        if self.center:
            z_s = z_s - z_s.mean(dim=1, keepdim=True)
            z_t = z_t - z_t.mean(dim=1, keepdim=True)
        return (z_s - z_t).pow(2).sum(dim=1).mean() / (2 * z_s.shape[1])


def dkd_terms(s_logits: torch.Tensor, t_logits: torch.Tensor, label: torch.Tensor, T, reduction: str = "mean",
              standardize: bool = False):
    """Decoupled KD (Zhao et al., CVPR 2022): (TCKD, NCKD), KLs without the T^2, batch-mean or per sample.

    TCKD is the KL between the binary (target, non-target) distributions; NCKD the KL between the
    distributions over the non-target classes. KL(p_t||p_s) = TCKD + (1 - p_t[target]) * NCKD.
    ``standardize``: of the z-scored logits (Sun et al. 2024; their mdistiller/distillers/DKD.py ``dkd_loss``).
    """
    if standardize:
        s_logits, t_logits = standardize_logits(s_logits), standardize_logits(t_logits)
    s, t = f32(s_logits) / T, f32(t_logits) / T
    gt = F.one_hot(label, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1)
    # Non-target distributions: mask the target logit out with a large negative number.
    log_q_s = F.log_softmax(s - 1000.0 * gt, dim=1)
    log_q_t = F.log_softmax(t - 1000.0 * gt, dim=1)
    q_t = log_q_t.exp()
    nckd = (q_t * (log_q_t - log_q_s)).masked_fill(gt, 0.0).sum(1)
    return (tckd.mean(), nckd.mean()) if reduction == "mean" else (tckd, nckd)


@register_distiller("dkd")
class DKD(Distiller):
    """beta * min((epoch + 1) / warmup, 1) * T^2 * (dkd_alpha * TCKD + dkd_beta * NCKD), epochs 0-based
    (the paper's code counts from 1, so its first epoch already has weight 1/warmup).

    Options (the paper's CIFAR defaults): ``dkd_alpha`` 1.0, ``dkd_beta`` 8.0, ``warmup`` 20 epochs.
    The paper's recipe replaces KD: set gamma=1, alpha=0. ``distill.logit_standardize`` z-scores both logits first
    (the logit-standardization recipe: T=2, dkd_alpha 9, dkd_beta 72). The term is returned per sample.
    """

    default_beta = 1.0
    own_term_uses_T = True
    known_options = ("dkd_alpha", "dkd_beta", "warmup")

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.dkd_alpha = self.opt("dkd_alpha", 1.0)
        self.dkd_beta = self.opt("dkd_beta", 8.0)
        self.warmup = self.opt("warmup", 20, int, gt=-1)

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        tckd, nckd = dkd_terms(s_logits, t_logits, batch["label"], T, "none", self.logit_standardize)
        ramp = min((epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return ramp * (T * T) * (self.dkd_alpha * tckd + self.dkd_beta * nckd)  # [B]: the base takes the mean
