"""Per-sample losses the strategies weigh and rank by, consistent with the distiller's batch losses."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def loss_weights(distiller, losses: dict) -> tuple[float, float]:
    """(weight of CE, weight of KD) as the distiller applied them; 0 for a term it did not compute."""
    w_ce = (1.0 if getattr(distiller, "name", "") == "ce" else float(distiller.gamma)) if "ce" in losses else 0.0
    w_kd = float(getattr(distiller, "alpha", 0.0)) if "kd" in losses else 0.0
    return w_ce, w_kd


def per_sample_loss(logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor, T: float,
                    w_ce: float, w_kd: float) -> torch.Tensor:
    """``w_ce * CE_i + w_kd * T^2 * KL_i(p_t || p_s)`` per sample (float32): the batch mean of it is the
    distiller's ``ce + kd`` terms (``kcd_ray.distill.base``)."""
    z = logits.float()
    out = torch.zeros(z.shape[0], device=z.device, dtype=torch.float32)
    if w_ce:
        out = out + w_ce * F.cross_entropy(z, labels, reduction="none")
    if w_kd and teacher_logits is not None:
        log_p_s = F.log_softmax(z / T, dim=1)
        p_t = F.softmax(teacher_logits.float() / T, dim=1)
        out = out + w_kd * (T * T) * F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1)
    return out
