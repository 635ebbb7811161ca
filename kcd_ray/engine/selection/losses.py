"""Per-sample losses the strategies weigh and rank by, consistent with the distiller's batch losses."""

from __future__ import annotations

import torch


def loss_weights(distiller, losses: dict) -> tuple[float, float]:
    """(weight of CE, weight of KD) as the distiller applied them; 0 for a term it did not compute."""
    w_ce = (1.0 if getattr(distiller, "name", "") == "ce" else float(distiller.gamma)) if "ce" in losses else 0.0
    w_kd = float(getattr(distiller, "alpha", 0.0)) if "kd" in losses else 0.0
    return w_ce, w_kd


def per_sample_loss(output) -> torch.Tensor:
    """The step's per-sample loss (float32 [B]): the sum of the distiller's ``StepOutput.per_sample`` terms (CE, KD
    and per-sample method terms such as dkd's, each with its weight), so its batch mean is those terms of
    ``output.losses`` exactly as the distiller computed them (standardized logits, a learned temperature,
    several teachers). Terms that are not per-sample means (feature losses) are not in it."""
    per = output.per_sample
    if not per:
        raise ValueError(f"selection.strategy=infobatch needs the distiller's per-sample losses; its step gave "
                         f"none for terms {sorted(output.losses)}")
    return sum(v.float() for v in per.values())
