"""Contrastive representation distillation (CRD, Tian et al. 2020), RepDistiller's NCE form.

Both pooled vectors are embedded (linear + L2 norm, ``feat_dim``); a memory bank keeps a momentum
average of each sample's student and teacher embedding. The student embedding must pick out the
teacher's memory of the same sample among ``nce_k`` negatives, and vice versa.

Options (RepDistiller defaults): ``feat_dim`` 128, ``nce_k`` 16384, ``nce_t`` 0.07, ``nce_m`` 0.5,
``negatives`` "other_class" (RepDistiller's 'exact' mode) or "uniform", ``num_samples`` (N, or pass
``num_samples=`` to ``build_distiller``), ``seed`` 0 for the bank's initialisation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from kcd_ray.config import ConfigError
from kcd_ray.distill.base import Distiller, register_distiller
from kcd_ray.distill.connectors import Embed, f32
from kcd_ray.distill.memory import MemoryBank, all_reduce_mean

_EPS = 1e-7


def nce_loss(x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss of RepDistiller's ContrastLoss: column 0 holds the positive's (normalised) score,
    the rest the negatives'; the noise distribution is uniform over the N samples."""
    m = x.shape[1] - 1
    mpn = m / float(num_samples)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + mpn + _EPS))
    log_d0 = torch.log(mpn / (x[:, 1:] + mpn + _EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def required_num_samples(d: Distiller) -> int:
    n = d.num_samples
    if n is None or int(n) < 2:
        raise ConfigError(
            f"distill.options.num_samples: method {d.name!r} needs the number of original training samples "
            f"(>= 2) for its memory bank; got {n!r}"
        )
    return int(n)


class CRDHead(nn.Module):
    """Embeddings, memory bank and the normalisation constants Z (set from the first batch)."""

    def __init__(self, s_dim: int, t_dim: int, num_samples: int, feat_dim: int, nce_k: int, nce_t: float,
                 nce_m: float, other_class: bool, seed: int):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.memory = MemoryBank(num_samples, feat_dim, ("student", "teacher"), nce_m, seed)
        self.nce_k, self.nce_t, self.other_class = nce_k, nce_t, other_class
        self.z = torch.full((2,), -1.0)  # (Z_student_anchor, Z_teacher_anchor); extra state, not a buffer

    def get_extra_state(self) -> dict:
        return {"z": self.z.cpu()}

    def set_extra_state(self, state: dict) -> None:
        self.z.copy_(state["z"])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.z = fn(self.z)
        return self

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.memory.check_ids(ids)
        v_s, v_t = f32(self.embed_s(f_s)), f32(self.embed_t(f_t))
        if negatives is None:
            negatives = self.memory.sample_negatives(ids, labels, self.nce_k, self.other_class)
        idx = torch.cat([ids.view(-1, 1).to(negatives.device), negatives], dim=1)  # positive first
        w_t = self.memory.get("teacher", idx).to(v_s.dtype)  # (B, K+1, d)
        w_s = self.memory.get("student", idx).to(v_t.dtype)
        out_s = torch.exp(torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2) / self.nce_t)  # student anchor
        out_t = torch.exp(torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2) / self.nce_t)  # teacher anchor
        n = self.memory.num_samples
        if bool((self.z < 0).any()):
            # Z ~ N * E[exp(score / t)], fixed from the first batch (averaged over DDP ranks).
            z = all_reduce_mean(torch.stack([out_s.detach().mean(), out_t.detach().mean()]) * n)
            self.z.copy_(z.to(self.z.device, self.z.dtype))
        z = self.z.to(out_s.device, out_s.dtype)
        loss = nce_loss(out_s / z[0], n) + nce_loss(out_t / z[1], n)
        self.memory.update(ids, labels, student=v_s, teacher=v_t)
        return loss


@register_distiller("crd")
class CRD(Distiller):
    teacher_outputs = ("logits", "feat")  # feats[-1] only: a teacher-output cache can serve it
    needs_features = True
    default_beta = 0.8
    known_options = ("feat_dim", "nce_k", "nce_t", "nce_m", "negatives", "seed")

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        negatives = self.opt("negatives", "other_class", str)
        if negatives not in ("other_class", "uniform"):
            raise ConfigError(f"distill.options.negatives: {negatives!r} is not one of: other_class, uniform")
        self.crd = CRDHead(
            self.s_shapes[-1].numel(), self.t_shapes[-1].numel(), required_num_samples(self),
            self.opt("feat_dim", 128, int, gt=0), self.opt("nce_k", 16384, int, gt=0), self.opt("nce_t", 0.07, gt=0),
            self.opt("nce_m", 0.5), negatives == "other_class", self.opt("seed", 0, int),
        )

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        return self.crd(s_feats[-1], t_feats[-1], batch["sample_id"], batch["label"])
