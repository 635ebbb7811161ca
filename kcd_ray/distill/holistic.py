"""Holistic knowledge distillation (HKD; Zhou et al., ICCV 2021), following the official code.

The spec is ``docs/methods/hkd.md``; the reference is the official code,
github.com/wyc-ruiker/HKD: ``distiller_zoo/GNN.py`` (``GNNLoss``, ``knn_graph``, ``NCEAverage``),
``dataset/cifar100.py`` (``CIFAR100InstanceSample``, mode ``hkd``) and ``scripts/run_cifar_distill.sh``.

What one step computes (B = the batch, all DDP ranks together; i = a sample of it, ``sample_id`` i):

- Individual embeddings ``s_i = norm(W_s f^s_i + b_s)``, ``t_i = norm(W_t f^t_i + b_t)`` of the pooled
  vectors (``feats[-1]``), ``feat_dim`` 128. ``embed_t`` is trained (the teacher backbone is not).
- Two memory banks, ``M^S`` and ``M^T`` (N x 128, indexed by the original ``sample_id``), initialised
  i.i.d. uniform on [-a, a], a = 1/sqrt(128/3), not normalised (``memory.MemoryBank``, checkpointed).
- Negatives ``neg(i)``: ``nce_k`` (16384) ids drawn uniformly *without* replacement from the samples whose
  label differs from ``y_i`` (with replacement when there are fewer, as the official data loader does).
- ``L_ind = mean_i l(s_i, M^T_i, M^S[neg(i)]) + mean_i l(t_i, M^S_i, M^T[neg(i)])``, with ``l`` InfoNCE at
  ``nce_t`` 0.07: the positive is the *other* net's bank row of the sample, the negatives come from the
  anchor's *own* net's bank.
- One instance graph per net, from its own detached softmax (temperature 1): ``D_ij = 1 - cos(P_i, P_j)``,
  ``D_ii = -1``; ``N(i)`` = the ``knn`` (8) smallest ``D_ij`` (the sample itself and its 7 nearest); edges are
  directed j -> i for j in N(i), not symmetrised, so every in-degree is exactly 8.
- One TAGConv layer (one hop, DGL's form, Xavier-normal gain sqrt(2)):
  ``g_i = norm(W_0 h_i + W_1 (D_in^-1/2 A D_in^-1/2 h)_i + b)``, i.e. ``W_1`` times the mean of h over N(i).
- ``L_hol = mean_i l(g^s_i, norm(0.75 M^T_i + 0.25 g^t_i), M^S[neg(i)]) + mean_i l(g^t_i, norm(0.75 M^S_i +
  0.25 g^s_i), M^T[neg(i)])``: smoothed positives (``smooth`` 0.75), detached, never written to the banks.
- ``L_HKD = L_ind + L_hol``, then ``M^S_i <- norm(0.9 M^S_i + 0.1 s_i)``, ``M^T_i <- norm(0.9 M^T_i + 0.1 t_i)``
  (``momentum`` 0.9; the individual embeddings, never the graph outputs). If ``B < knn``: ``L_HKD = L_ind``
  and the banks are not updated.
- Weights: ``gamma * CE + alpha * KD_T + beta * L_HKD`` with HKD+KD's gamma 1, alpha 1, beta 3 by default
  (HKD alone: ``distill.alpha=0``). ``distill.beta`` unset gives 3 (``default_beta``). ``distill.gamma`` and
  ``distill.alpha`` have no "unset" value in ``DistillConfig`` and base.py has no per-method hook for them,
  so a value equal to the global KD default (0.1 / 0.9) is read as "unset" and becomes HKD's 1 / 1; option
  ``hkd_weights: false`` takes them as given instead.

Harness specifics (not in the official single-GPU code):

- Labels. The distiller is not given the data set's labels: the bank records each sample's label when the
  sample is first seen (``MemoryBank.labels``, checkpointed; recorded for the whole batch before the
  negatives are drawn, also on a batch with ``B < knn``). A sample whose label is still unknown counts as a
  candidate negative, so during the first epoch a negative can share the anchor's class.
- Randomness. The Distiller interface has no step counter and no run seed, so each anchor's negatives come
  from its own ``torch.Generator`` seeded with a hash of (option ``seed``, epoch, sample id): they do not
  depend on the global RNG, on the batch's composition or order, or on the DDP rank, so a resumed run (same
  checkpointed labels) draws the same negatives. The stream depends on the bank's device (CPU vs CUDA).
- DDP. The graph is built over the all-gathered batch (docs/methods/hkd.md's reading): logits and embeddings are
  gathered, this rank's rows keep their gradient and the other ranks' rows are constants; each rank's loss
  averages over its own anchors (DDP then averages the gradients); the ``B < knn`` rule uses the gathered
  batch size, so every rank decides alike; the banks are updated from the gathered embeddings and ids, so
  they stay identical on every rank. Gradients from another rank's anchors to this rank's embeddings
  (through the neighbour mean) are dropped.

Options: ``feat_dim`` 128, ``nce_k`` 16384, ``nce_t`` 0.07, ``momentum`` 0.9, ``smooth`` 0.75, ``knn`` 8,
``negatives`` "other_class" | "uniform" (any other sample), ``seed`` 0 (bank initialisation and negatives),
``hkd_weights`` true, ``variant`` "official" | "simplified", ``num_samples`` (N).

``variant: simplified`` is this harness's earlier HKD, kept for comparison with old runs: negatives from the
*other* net's bank (as in CRD), a symmetric kNN graph without self loops (``D^-1/2 (A + A^T) D^-1/2``,
binarised), the graph term only when ``B > knn``, and a bank update on every batch.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcd_ray.config import ConfigError, DistillConfig
from kcd_ray.distill.base import Distiller, register_distiller
from kcd_ray.distill.connectors import Embed, f32
from kcd_ray.distill.contrastive import required_num_samples
from kcd_ray.distill.memory import MemoryBank, all_gather_cat, all_gather_rows

VARIANTS = ("official", "simplified")
_KD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DistillConfig) if f.name in ("gamma", "alpha")}


# ---------------------------------------------------------------------- instance graph


def knn_graph(logits: torch.Tensor, k: int) -> torch.Tensor:
    """HKD's instance graph as a dense (B, B) 0/1 matrix, ``A[i, j] = 1`` iff there is an edge j -> i.

    ``N(i)`` = the ``k`` smallest ``D_ij = 1 - cos(P_i, P_j)`` with ``P = softmax(logits)`` (detached) and
    ``D_ii = -1``, so i itself is always one of them: every row (in-degree) sums to exactly ``k``. The official
    ``knn_graph`` puts the neighbour index in the row of a SciPy matrix, the source in DGL: neighbour -> centre.
    """
    p = F.softmax(f32(logits.detach()), dim=1)
    dist = 1 - F.normalize(p, dim=1) @ F.normalize(p, dim=1).t()
    dist.fill_diagonal_(-1.0)
    nbr = dist.topk(k, dim=1, largest=False).indices
    return torch.zeros_like(dist).scatter_(1, nbr, 1.0)


def tag_norm(adj: torch.Tensor) -> torch.Tensor:
    """DGL TAGConv's propagation matrix ``D_in^-1/2 A D_in^-1/2`` (in-degrees = row sums of ``adj``, >= 1).
    With every in-degree k, ``tag_norm(adj) @ h`` is the mean of h over each node's in-neighbours."""
    d = adj.sum(1).clamp_min(1.0).rsqrt()
    return d.unsqueeze(1) * adj * d.unsqueeze(0)


def symmetric_knn_adjacency(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``variant: simplified`` only: symmetric, degree-normalised kNN adjacency (B, B), no self loops."""
    p = F.normalize(F.softmax(f32(logits.detach()), dim=1), dim=1)
    sim = p @ p.t()
    sim.fill_diagonal_(-float("inf"))
    nbr = sim.topk(k, dim=1).indices
    a = torch.zeros_like(sim).scatter_(1, nbr, 1.0)
    a = ((a + a.t()) > 0).to(sim.dtype)
    d = a.sum(1).clamp_min(1.0).rsqrt()
    return d.unsqueeze(1) * a * d.unsqueeze(0)


class GraphLayer(nn.Module):
    """TAGConv with one hop (DGL's ``TAGConv(dim, dim, k=1)``), then L2 normalisation:
    ``norm(W [h ; adj h_src] + b)``, ``W = [W_0 W_1]``. Weight: Xavier-normal with gain sqrt(2) (DGL's
    ``reset_parameters``); bias: PyTorch's ``nn.Linear`` default."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)
        nn.init.xavier_normal_(self.linear.weight, gain=nn.init.calculate_gain("relu"))

    def forward(self, h: torch.Tensor, adj: torch.Tensor, h_src: torch.Tensor | None = None) -> torch.Tensor:
        """``adj`` (b, B): propagation rows of the b nodes ``h`` (b, d) among the B nodes ``h_src`` (B, d);
        ``h_src`` defaults to ``h`` (then b = B)."""
        agg = adj.to(h.dtype) @ (h if h_src is None else h_src)
        return F.normalize(self.linear(torch.cat([h, agg], dim=1)), dim=1)


# ---------------------------------------------------------------------- contrastive parts


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """Mean over i of ``-log(e^{a.p/t} / (e^{a.p/t} + sum_j e^{a.n_j/t}))``: anchor/positive (B, d),
    negatives (B, K, d) (the official ``NCESoftmaxLoss`` on ``[pos, neg] / t``)."""
    pos = (anchor * positive).sum(1, keepdim=True)
    neg = torch.bmm(negatives, anchor.unsqueeze(2)).squeeze(2)
    logits = torch.cat([pos, neg], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


def negatives_seed(seed: int, epoch: int, sample_id: int) -> int:
    """The seed of one anchor's negatives: a hash of (seed, epoch, sample id), stable across processes."""
    digest = hashlib.blake2b(f"hkd-negatives:{int(seed)}:{int(epoch)}:{int(sample_id)}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_negatives(known_labels: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, k: int, seed: int,
                   epoch: int, other_class: bool = True, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """(B, k) negative ids per anchor, as the official loader draws them in mode ``hkd``: uniformly without
    replacement among the samples whose (known) label differs from the anchor's (``other_class``; else any
    other sample), with replacement when there are fewer than ``k``; the anchor itself is never drawn.

    ``known_labels`` (N,): the label of every sample, -1 where unknown (unknown counts as a different class).
    Each row has its own generator (``negatives_seed``): the k smallest of N uniform keys, restricted to the
    candidates, are a uniform k-subset. The global RNG is not touched. Rows go in chunks of ~``chunk_elems`` keys.
    """
    n, dev = known_labels.numel(), known_labels.device
    id_list = [int(i) for i in ids.tolist()]
    labels = labels.to(dev)
    out = torch.empty(len(id_list), k, dtype=torch.long, device=dev)
    step = max(1, chunk_elems // n)
    for start in range(0, len(id_list), step):
        part = id_list[start:start + step]
        gens = [torch.Generator(device=dev).manual_seed(negatives_seed(seed, epoch, i)) for i in part]
        keys = torch.stack([torch.rand(n, generator=g, device=dev) for g in gens])
        rows = torch.arange(len(part), device=dev)
        valid = torch.ones_like(keys, dtype=torch.bool)
        valid[rows, torch.tensor(part, device=dev)] = False
        if other_class:
            valid &= known_labels.unsqueeze(0) != labels[start:start + len(part)].unsqueeze(1)
        count = valid.sum(1).tolist()
        if k <= n:
            out[start:start + len(part)] = keys.masked_fill(~valid, 2.0).topk(k, dim=1, largest=False).indices
        for r, c in enumerate(count):
            if c >= k:
                continue
            weights = valid[r].to(keys.dtype)
            if c == 0:  # no sample of another (known) class: any other sample
                weights = torch.ones(n, dtype=keys.dtype, device=dev)
                weights[part[r]] = 0
            out[start + r] = torch.multinomial(weights, k, replacement=True, generator=gens[r])
    return out


# ---------------------------------------------------------------------- the distiller


@register_distiller("hkd")
class HKD(Distiller):
    teacher_outputs = ("logits", "feat")  # feats[-1] only: a teacher-output cache can serve it
    needs_features = True
    default_beta = 3.0  # HKD's CIFAR-100 script: -b 3
    default_gamma = 1.0  # train_student.py: -r 1
    default_alpha = 1.0  # HKD+KD (the README's example and headline row): -a 1
    known_options = ("feat_dim", "nce_k", "nce_t", "momentum", "smooth", "knn", "negatives", "seed", "variant",
                     "hkd_weights")

    def __init__(self, student, teacher, cfg, num_classes, **kw):
        super().__init__(student, teacher, cfg, num_classes, **kw)
        self.variant = self.opt("variant", "official", str)
        if self.variant not in VARIANTS:
            raise ConfigError(f"distill.options.variant: {self.variant!r} is not one of: {', '.join(VARIANTS)}")
        if self.opt("hkd_weights", True, bool):
            # DistillConfig has no "unset" for gamma/alpha: the global KD defaults stand for it (module doc)
            if cfg.gamma == _KD_DEFAULTS["gamma"]:
                self.gamma = self.default_gamma
            if teacher is not None and cfg.alpha == _KD_DEFAULTS["alpha"]:
                self.alpha = self.default_alpha
        dim = self.opt("feat_dim", 128, int, gt=0)
        negatives = self.opt("negatives", "other_class", str)
        if negatives not in ("other_class", "uniform"):
            raise ConfigError(f"distill.options.negatives: {negatives!r} is not one of: other_class, uniform")
        self.other_class = negatives == "other_class"
        self.nce_k, self.nce_t = self.opt("nce_k", 16384, int, gt=0), self.opt("nce_t", 0.07, gt=0)
        self.smooth, self.knn = self.opt("smooth", 0.75), self.opt("knn", 8, int, gt=0)
        self.seed = self.opt("seed", 0, int)
        self.embed_s = Embed(self.s_shapes[-1].numel(), dim)
        self.embed_t = Embed(self.t_shapes[-1].numel(), dim)
        self.gnn_s, self.gnn_t = GraphLayer(dim), GraphLayer(dim)
        self.memory = MemoryBank(required_num_samples(self), dim, ("student", "teacher"),
                                 self.opt("momentum", 0.9), self.seed)

    def uses_graph(self, batch_size: int) -> bool:
        """HKD: the graph term (and the bank update) need ``B >= knn``; simplified: ``B > knn``."""
        return batch_size >= self.knn if self.variant == "official" else batch_size > self.knn

    def _propagation(self, logits_all: torch.Tensor) -> torch.Tensor:
        if self.variant == "official":
            return tag_norm(knn_graph(logits_all, self.knn))
        return symmetric_knn_adjacency(logits_all, self.knn)

    def extra_loss(self, s_feats, t_feats, s_logits, t_logits, batch, T, epoch):
        ids, labels = batch["sample_id"], batch["label"]
        mem = self.memory
        mem.check_ids(ids)
        # the whole batch over all DDP ranks (as is, in one process); this rank's rows: [off, off + b)
        all_ids, all_labels = all_gather_cat(ids.detach()), all_gather_cat(labels.detach())
        mem.record_labels(all_ids, all_labels, gathered=True)
        e_s, e_t = f32(self.embed_s(s_feats[-1])), f32(self.embed_t(t_feats[-1]))
        e_s_all, off = all_gather_rows(e_s)
        e_t_all, _ = all_gather_rows(e_t)
        b, big_b = len(ids), len(all_ids)

        neg = draw_negatives(mem.labels, ids, labels, self.nce_k, self.seed, epoch, self.other_class)
        m_s, m_t = mem.get("student", ids).to(e_s.dtype), mem.get("teacher", ids).to(e_s.dtype)
        w_s, w_t = mem.get("student", neg).to(e_s.dtype), mem.get("teacher", neg).to(e_s.dtype)
        # HKD: each anchor's negatives from its own net's bank; simplified: from the other net's (CRD)
        neg_s, neg_t = (w_s, w_t) if self.variant == "official" else (w_t, w_s)
        # individual knowledge: the positive is the other net's bank row of the same sample
        loss = info_nce(e_s, m_t, neg_s, self.nce_t) + info_nce(e_t, m_s, neg_t, self.nce_t)
        graph = self.uses_graph(big_b)
        if graph:
            rows = slice(off, off + b)
            g_s = f32(self.gnn_s(e_s, self._propagation(all_gather_cat(s_logits.detach()))[rows], e_s_all))
            g_t = f32(self.gnn_t(e_t, self._propagation(all_gather_cat(t_logits.detach()))[rows], e_t_all))
            with torch.no_grad():  # smoothed positives, not written back
                target_t = F.normalize(self.smooth * m_t + (1 - self.smooth) * g_t, dim=1)
                target_s = F.normalize(self.smooth * m_s + (1 - self.smooth) * g_s, dim=1)
            loss = loss + info_nce(g_s, target_t, neg_s, self.nce_t) + info_nce(g_t, target_s, neg_t, self.nce_t)
        else:
            # keep the graph layers in the autograd graph (zero gradient) so that DDP without
            # find_unused_parameters does not stall on a short batch
            loss = loss + 0.0 * sum(p.sum() for p in [*self.gnn_s.parameters(), *self.gnn_t.parameters()])
        if graph or self.variant == "simplified":  # HKD: no bank update when B < knn
            mem.update(all_ids, all_labels, gathered=True, student=e_s_all, teacher=e_t_all)
        return loss
