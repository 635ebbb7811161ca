"""Holistic knowledge distillation (HKD; Zhou et al., ICCV 2021), written for this harness.

Each net's pooled vector is embedded (linear + L2 norm). An instance graph links every sample of the
batch to its ``knn`` nearest neighbours by the cosine similarity of the net's (detached) softmax
outputs; one graph layer (TAGConv with one hop: a linear map of [h, A_norm h]) aggregates each
sample's neighbours into a *holistic* embedding. Both the individual and the holistic embeddings are
distilled contrastively (InfoNCE, temperature ``nce_t``) against a memory bank of the other net's
embeddings: positive = the same sample, negatives = ``nce_k`` other samples. The holistic positive is
HKD's smoothed target: ``normalize(smooth * memory[id] + (1 - smooth) * other net's holistic)``.

Options: ``feat_dim`` 128, ``nce_k`` 16384, ``nce_t`` 0.07, ``momentum`` 0.9 (bank), ``smooth`` 0.75,
``knn`` 8, ``negatives`` "other_class" | "uniform", ``num_samples`` (N), ``seed`` 0.
Batches with no more than ``knn`` samples use the individual term only, as in HKD's code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcd_ray.config import ConfigError
from kcd_ray.distill.base import Distiller, register_distiller
from kcd_ray.distill.connectors import Embed, f32
from kcd_ray.distill.contrastive import required_num_samples
from kcd_ray.distill.memory import MemoryBank


def knn_adjacency(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetric, degree-normalised kNN adjacency (B, B) over the batch, no self loops."""
    p = F.normalize(F.softmax(f32(logits.detach()), dim=1), dim=1)
    sim = p @ p.t()
    sim.fill_diagonal_(-float("inf"))
    nbr = sim.topk(k, dim=1).indices
    a = torch.zeros_like(sim).scatter_(1, nbr, 1.0)
    a = ((a + a.t()) > 0).to(sim.dtype)
    d = a.sum(1).clamp_min(1.0).rsqrt()
    return d.unsqueeze(1) * a * d.unsqueeze(0)


class GraphLayer(nn.Module):
    """One-hop TAGConv: W [h, A h], L2-normalised."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(torch.cat([h, adj @ h], dim=1)), dim=1)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """Cross-entropy of picking ``positive`` (B, d) among [positive, negatives (B, K, d)]."""
    pos = (anchor * positive).sum(1, keepdim=True)
    neg = torch.bmm(negatives, anchor.unsqueeze(2)).squeeze(2)
    logits = torch.cat([pos, neg], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


@register_distiller("hkd")
class HKD(Distiller):
    needs_features = True
    default_beta = 3.0  # HKD's CIFAR-100 script: -a 1 -b 3
    known_options = ("feat_dim", "nce_k", "nce_t", "momentum", "smooth", "knn", "negatives", "seed")

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        dim = self.opt("feat_dim", 128, int, gt=0)
        negatives = self.opt("negatives", "other_class", str)
        if negatives not in ("other_class", "uniform"):
            raise ConfigError(f"distill.options.negatives: {negatives!r} is not one of: other_class, uniform")
        self.other_class = negatives == "other_class"
        self.nce_k, self.nce_t = self.opt("nce_k", 16384, int, gt=0), self.opt("nce_t", 0.07, gt=0)
        self.smooth, self.knn = self.opt("smooth", 0.75), self.opt("knn", 8, int, gt=0)
        self.embed_s = Embed(self.s_shapes[-1].numel(), dim)
        self.embed_t = Embed(self.t_shapes[-1].numel(), dim)
        self.gnn_s, self.gnn_t = GraphLayer(dim), GraphLayer(dim)
        self.memory = MemoryBank(required_num_samples(self), dim, ("student", "teacher"),
                                 self.opt("momentum", 0.9), self.opt("seed", 0, int))

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        ids, labels = batch["sample_id"], batch["label"]
        mem = self.memory
        mem.check_ids(ids)
        e_s, e_t = f32(self.embed_s(s_feats[-1])), f32(self.embed_t(t_feats[-1]))
        neg = mem.sample_negatives(ids, labels, self.nce_k, self.other_class)
        m_s, m_t = mem.get("student", ids).to(e_s.dtype), mem.get("teacher", ids).to(e_s.dtype)
        w_s, w_t = mem.get("student", neg).to(e_s.dtype), mem.get("teacher", neg).to(e_s.dtype)
        # individual knowledge: each embedding must find the other net's memory of its own sample
        loss = info_nce(e_s, m_t, w_t, self.nce_t) + info_nce(e_t, m_s, w_s, self.nce_t)
        if len(ids) > self.knn:
            g_s = f32(self.gnn_s(e_s, knn_adjacency(s_logits, self.knn)))
            g_t = f32(self.gnn_t(e_t, knn_adjacency(t_logits, self.knn)))
            with torch.no_grad():
                target_t = F.normalize(self.smooth * m_t + (1 - self.smooth) * g_t, dim=1)
                target_s = F.normalize(self.smooth * m_s + (1 - self.smooth) * g_s, dim=1)
            loss = loss + info_nce(g_s, target_t, w_t, self.nce_t) + info_nce(g_t, target_s, w_s, self.nce_t)
        else:
            # keep the graph layers in the autograd graph (zero gradient) so that DDP without
            # find_unused_parameters does not stall on a short last batch
            loss = loss + 0.0 * sum(p.sum() for p in [*self.gnn_s.parameters(), *self.gnn_t.parameters()])
        mem.update(ids, labels, student=e_s, teacher=e_t)
        return loss
