"""Distillers that match relations between the samples of a batch: SP, CC, RKD, PKT.

Relations are batch x batch matrices, so student and teacher feature sizes never need to agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kcd_ray.distill.base import Distiller, register_distiller
from kcd_ray.distill.connectors import Embed, f32


@register_distiller("sp")
class SP(Distiller):
    """Similarity preserving: row-normalised Gram matrices of the last feature maps (``feats[-2]``)
    should agree; squared Frobenius distance / B^2."""

    needs_features = True
    default_beta = 3000.0

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        f_s, f_t = f32(s_feats[-2]).flatten(1), f32(t_feats[-2]).flatten(1)
        g_s = F.normalize(f_s @ f_s.t(), dim=1)
        g_t = F.normalize(f_t @ f_t.t(), dim=1)
        b = f_s.shape[0]
        return (g_t - g_s).pow(2).sum() / (b * b)


@register_distiller("cc")
class CC(Distiller):
    """Correlation congruence, in RepDistiller's form: linear embeddings (option ``feat_dim``,
    default 128) of both pooled vectors; mean over consecutive sample pairs of
    sum_d |e_s - e_t|_i * |e_s - e_t|_{i+1}."""
    teacher_outputs = ("logits", "feat")  # feats[-1] only: a teacher-output cache can serve it

    needs_features = True
    default_beta = 0.02
    known_options = ("feat_dim",)

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        dim = self.opt("feat_dim", 128, int, gt=0)
        self.embed_s = Embed(self.s_shapes[-1].numel(), dim, normalize=False)
        self.embed_t = Embed(self.t_shapes[-1].numel(), dim, normalize=False)

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        delta = (f32(self.embed_s(s_feats[-1])) - f32(self.embed_t(t_feats[-1]))).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()


def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@register_distiller("rkd")
class RKD(Distiller):
    """Relational KD on the pooled vectors: Huber loss between mean-normalised pairwise distances
    (weight ``w_d``, default 25) plus between triplet angles (weight ``w_a``, default 50)."""
    teacher_outputs = ("logits", "feat")  # feats[-1] only: a teacher-output cache can serve it

    needs_features = True
    default_beta = 1.0
    known_options = ("w_d", "w_a")

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.w_d, self.w_a = self.opt("w_d", 25.0), self.opt("w_a", 50.0)

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        s, t = f32(s_feats[-1]).flatten(1), f32(t_feats[-1]).flatten(1)
        with torch.no_grad():
            t_d = _pdist(t)
            t_d = t_d / t_d[t_d > 0].mean()
            t_a = _angles(t)
        d = _pdist(s)
        d = d / d[d > 0].mean()
        loss_d = F.smooth_l1_loss(d, t_d)
        loss_a = F.smooth_l1_loss(_angles(s), t_a)
        return self.w_d * loss_d + self.w_a * loss_a


def _cosine_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    sim = (x @ x.t() + 1.0) / 2.0  # cosine similarity mapped to [0, 1]
    return sim / sim.sum(dim=1, keepdim=True)


@register_distiller("pkt")
class PKT(Distiller):
    """Probabilistic knowledge transfer: KL between the conditional distributions that the cosine
    similarities of the pooled vectors induce over the batch."""
    teacher_outputs = ("logits", "feat")  # feats[-1] only: a teacher-output cache can serve it

    needs_features = True
    default_beta = 30000.0

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        eps = 1e-7
        p_s = _cosine_probabilities(f32(s_feats[-1]).flatten(1), eps)
        p_t = _cosine_probabilities(f32(t_feats[-1]).flatten(1), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
