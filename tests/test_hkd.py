"""HKD (kcd_ray/distill/holistic.py) against docs/methods/hkd.md, point by point: pure torch, no Ray.

Most checks compare the distiller with a float64 NumPy re-implementation written from docs/methods/hkd.md (``ref_hkd``),
on a tiny problem where the negatives are fixed by construction: N = 12 samples in 3 classes of 4, all labels
known, ``nce_k`` = 8 = the number of samples of the other classes, so drawing 8 without replacement among
them gives exactly that set, whatever the random stream. Each check also computes the tempting wrong
reading (other bank, symmetric graph, no smoothing, ...) and asserts that it differs, so the check can fail.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_nets import TinyNet, make_batch
from kcd_ray.config import ConfigError, DistillConfig
from kcd_ray.distill import build_distiller, kd_kl
from kcd_ray.distill.holistic import GraphLayer, draw_negatives, knn_graph, tag_norm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N12, K12 = 12, 8
LABELS12 = torch.arange(N12) % 3  # 3 classes of 4: every anchor has exactly 8 other-class samples


def make(options=None, *, num_samples=N12, seed=0, teacher=None, **cfg_kw):
    torch.manual_seed(seed)
    student, t = TinyNet(5, width=4), TinyNet(5, width=6)
    teacher = t if teacher is None else teacher
    opts = {"nce_k": K12, "feat_dim": 6}
    opts.update(options or {})
    cfg = DistillConfig(method="hkd", options=opts, **cfg_kw)
    return build_distiller(cfg, student, teacher, 5, image_size=8, num_samples=num_samples)


def tiny(options=None, seed=0):
    """float64 HKD over N12 with known labels and random unit-norm banks (student and teacher differ)."""
    d = make(options, seed=seed).double().eval()
    g = torch.Generator().manual_seed(100 + seed)
    d.memory.labels.copy_(LABELS12)
    for view in ("student", "teacher"):
        d.memory.banks[view].copy_(F.normalize(torch.randn(N12, 6, generator=g, dtype=torch.float64), dim=1))
    return d


def inputs(b, seed=0):
    """Pooled features (student 8-d, teacher 12-d), logits (5 classes) and a batch of b of the N12 ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(N12, generator=g)[:b]
    f_s, f_t = torch.randn(b, 8, generator=g, dtype=torch.float64), torch.randn(b, 12, generator=g, dtype=torch.float64)
    z_s, z_t = (3 * torch.randn(b, 5, generator=g, dtype=torch.float64),
                3 * torch.randn(b, 5, generator=g, dtype=torch.float64))
    return dict(f_s=f_s, f_t=f_t, z_s=z_s, z_t=z_t, batch={"sample_id": ids, "label": LABELS12[ids]})


def run(d, x, epoch=0):
    return d.extra_loss([x["f_s"]], [x["f_t"]], x["z_s"], x["z_t"], x["batch"], 4.0, epoch)


# ---------------------------------------------------------------------- the NumPy reference (docs/methods/hkd.md)


def _np(t):
    return t.detach().double().cpu().numpy()


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nce(a, p, negs, tau=0.07):
    """l(a, p, {n_j}) = -log(e^{a.p/tau} / (e^{a.p/tau} + sum_j e^{a.n_j/tau})) (docs/methods/hkd.md §4)."""
    scores = np.concatenate([[a @ p], negs @ a]) / tau
    m = scores.max()
    return -(scores[0] - m) + math.log(np.exp(scores - m).sum())


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ref_neighbours(z, k=8):
    """N(i) of docs/methods/hkd.md §5: the k smallest D_ij = 1 - cos(P_i, P_j), with D_ii = -1."""
    p = _softmax(z)
    dist = 1 - (p @ p.T) / np.outer(np.linalg.norm(p, axis=1), np.linalg.norm(p, axis=1))
    np.fill_diagonal(dist, -1.0)
    return [set(np.argsort(dist[i], kind="stable")[:k].tolist()) for i in range(len(z))]


def ref_propagation(z, graph, k=8):
    """(B, B) matrix M with (M h)_i = the neighbour aggregate of node i."""
    b = len(z)
    if graph == "directed":  # j -> i for j in N(i): the mean over N(i)
        m = np.zeros((b, b))
        for i, nbrs in enumerate(ref_neighbours(z, k)):
            m[i, sorted(nbrs)] = 1.0 / len(nbrs)
        return m
    if graph == "transposed":  # the wrong direction: i -> j, normalised like DGL (in-degree of the transpose)
        a = ref_propagation(z, "directed", k).T * k
        deg = np.maximum(a.sum(1), 1)
        return a / np.sqrt(np.outer(deg, deg))
    # symmetric, no self loops, D^-1/2 (A + A^T > 0) D^-1/2 (the simplified variant)
    p = _softmax(z)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    sim = p @ p.T
    np.fill_diagonal(sim, -np.inf)
    a = np.zeros((b, b))
    for i in range(b):
        a[i, np.argsort(-sim[i], kind="stable")[:k]] = 1
    a = ((a + a.T) > 0).astype(float)
    deg = np.maximum(a.sum(1), 1)
    return a / np.sqrt(np.outer(deg, deg))


def ref_hkd(d, x, neg, *, negatives_from="own", graph="directed", smooth=0.75, skip_below=8, momentum=0.9,
            bank_holds="individual"):
    """(L_HKD, new student bank, new teacher bank) per docs/methods/hkd.md §3-§7, in float64 NumPy.
    ``neg`` (B, K) negative ids; the keyword arguments select the wrong readings for the can-fail checks."""
    ids = x["batch"]["sample_id"].numpy()
    ms, mt = _np(d.memory.banks["student"]).copy(), _np(d.memory.banks["teacher"]).copy()
    s = _norm(_np(x["f_s"]) @ _np(d.embed_s.linear.weight).T + _np(d.embed_s.linear.bias))
    t = _norm(_np(x["f_t"]) @ _np(d.embed_t.linear.weight).T + _np(d.embed_t.linear.bias))
    neg_bank_s, neg_bank_t = (ms, mt) if negatives_from == "own" else (mt, ms)
    b = len(ids)
    loss = np.mean([_nce(s[i], mt[ids[i]], neg_bank_s[neg[i]]) for i in range(b)])
    loss += np.mean([_nce(t[i], ms[ids[i]], neg_bank_t[neg[i]]) for i in range(b)])
    use_graph = b >= skip_below
    if use_graph:
        def gnn(layer, h, z):
            w, bias = _np(layer.linear.weight), _np(layer.linear.bias)
            dim = h.shape[1]
            hbar = ref_propagation(_np(z), graph) @ h
            return _norm(h @ w[:, :dim].T + hbar @ w[:, dim:].T + bias)  # norm(W_0 h + W_1 hbar + b)

        gs, gt = gnn(d.gnn_s, s, x["z_s"]), gnn(d.gnn_t, t, x["z_t"])
        hat_t = _norm(smooth * mt[ids] + (1 - smooth) * gt)
        hat_s = _norm(smooth * ms[ids] + (1 - smooth) * gs)
        loss += np.mean([_nce(gs[i], hat_t[i], neg_bank_s[neg[i]]) for i in range(b)])
        loss += np.mean([_nce(gt[i], hat_s[i], neg_bank_t[neg[i]]) for i in range(b)])
        new_s, new_t = (s, t) if bank_holds == "individual" else (gs, gt)
        ms[ids] = _norm(momentum * ms[ids] + (1 - momentum) * new_s)
        mt[ids] = _norm(momentum * mt[ids] + (1 - momentum) * new_t)
    return loss, ms, mt


def fixed_negatives(ids):
    """With N12/K12: neg(i) is every sample of another class (any order: the loss is a sum over them)."""
    return np.stack([np.flatnonzero(LABELS12.numpy() != LABELS12[i].item()) for i in ids.tolist()])


# ---------------------------------------------------------------------- §3 banks and initialisation


def test_banks_kinds_initialisation_defaults_and_checkpoint():
    torch.manual_seed(0)
    d = build_distiller(DistillConfig(method="hkd"), TinyNet(5, 4), TinyNet(5, 6), 5, image_size=8, num_samples=64)
    mem = d.memory
    assert (d.variant, d.nce_k, d.nce_t, d.smooth, d.knn, mem.momentum) == ("official", 16384, 0.07, 0.75, 8, 0.9)
    assert set(mem.banks) == {"student", "teacher"}
    a = 1 / math.sqrt(128 / 3)
    assert a == pytest.approx(0.1531, abs=1e-4)
    for view, bank in mem.banks.items():
        assert bank.shape == (64, 128), view
        assert bank.abs().max() <= a and bank.abs().max() > 0.97 * a  # i.i.d. uniform on [-a, a]
        assert bank.mean().abs() < 0.01 and bank.std().item() == pytest.approx(a / math.sqrt(3), rel=0.03)
        assert bank.norm(dim=1).std() > 0.01  # not normalised at the start (E|row|^2 = 1, but rows vary)
    assert not torch.equal(mem.banks["student"], mem.banks["teacher"])
    assert (mem.labels == -1).all()
    # the banks (and the labels seen) are checkpointed; the teacher is not
    state = d.state_dict()
    assert set(state["memory._extra_state"]["banks"]) == {"student", "teacher"}
    assert not any(k.startswith("teacher") or k.startswith("_teacher") for k in state)
    assert {n for n, _ in d.named_parameters() if not n.startswith("student.")} == {
        f"{m}.linear.{p}" for m in ("embed_s", "embed_t", "gnn_s", "gnn_t") for p in ("weight", "bias")}
    torch.manual_seed(1)
    d2 = build_distiller(DistillConfig(method="hkd", options={"seed": 3}), TinyNet(5, 4), d.teacher, 5,
                         image_size=8, num_samples=64)
    assert not torch.equal(d2.memory.banks["student"], mem.banks["student"])
    d2.load_state_dict(state)
    for view in ("student", "teacher"):
        assert torch.equal(d2.memory.banks[view], mem.banks[view])


# ---------------------------------------------------------------------- §3 negatives


def test_negatives_uniform_without_replacement_other_class_and_seeded_per_sample():
    known = torch.arange(64) % 4  # 48 other-class candidates per anchor
    ids, labels = torch.tensor([5, 17, 40]), torch.tensor([1, 1, 0])
    rng = torch.get_rng_state()
    neg = draw_negatives(known, ids, labels, 40, seed=0, epoch=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not used
    assert neg.shape == (3, 40)
    for r in range(3):
        assert len(set(neg[r].tolist())) == 40  # without replacement
        assert (known[neg[r]] != labels[r]).all() and (neg[r] != ids[r]).all()
    # a function of (seed, epoch, sample id): not of the batch's composition or order, nor of the global RNG
    torch.manual_seed(123)
    again = draw_negatives(known, torch.tensor([40, 5]), torch.tensor([0, 1]), 40, seed=0, epoch=3)
    assert torch.equal(again[0], neg[2]) and torch.equal(again[1], neg[0])
    assert not torch.equal(draw_negatives(known, ids, labels, 40, seed=0, epoch=4), neg)
    assert not torch.equal(draw_negatives(known, ids, labels, 40, seed=1, epoch=3), neg)
    # uniform over the candidates: each is drawn with probability 40/48 per epoch
    counts = torch.zeros(64)
    for epoch in range(240):
        counts += torch.bincount(draw_negatives(known, ids[:1], labels[:1], 40, 0, epoch)[0], minlength=64)
    cand = known != 1
    assert counts[~cand].sum() == 0
    assert (counts[cand] - 200).abs().max() < 30  # 240 * 40/48 = 200, s.d. ~5.8
    # unknown labels (-1) count as other-class candidates
    partly = known.clone()
    partly[:32] = -1
    assert (draw_negatives(partly, ids, labels, 40, 0, 0) < 32).any()
    # fewer candidates than K: with replacement among them (RepDistiller's replace=True)
    few = draw_negatives(known, ids, labels, 100, 0, 0)
    assert few.shape == (3, 100) and all((known[few[r]] != labels[r]).all() for r in range(3))
    # "uniform": any sample but the anchor itself
    uni = draw_negatives(known, ids, labels, 63, 0, 0, other_class=False)
    assert all(sorted(uni[r].tolist()) == [j for j in range(64) if j != ids[r]] for r in range(3))


def test_negatives_come_from_the_anchors_own_bank_and_positives_from_the_others():
    """§4 on a batch of 7 (< 8: the individual term only), fixed negatives (every other-class sample)."""
    d = tiny()
    x = inputs(7, seed=1)
    neg = fixed_negatives(x["batch"]["sample_id"])
    own, _, _ = ref_hkd(d, x, neg)
    other, _, _ = ref_hkd(d, x, neg, negatives_from="other")
    loss = run(d, x).item()
    assert loss == pytest.approx(own, rel=1e-9)
    assert abs(own - other) > 1e-2 * abs(own)
    # and the distiller really drew every other-class sample once (K = 8 without replacement among 8)
    drawn = draw_negatives(d.memory.labels, x["batch"]["sample_id"], x["batch"]["label"], K12, d.seed, 0)
    assert [sorted(r) for r in drawn.tolist()] == neg.tolist()


# ---------------------------------------------------------------------- §5 graph and GNN


def _line_logits():
    """B = 10, two classes: nine clustered predictions (p = .50 ... .66) and one outlier (p = .99)."""
    p = torch.tensor([0.50, 0.52, 0.54, 0.56, 0.58, 0.60, 0.62, 0.64, 0.66, 0.99], dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=1)


def test_knn_graph_is_directed_neighbour_to_centre_with_self_loops_and_in_degree_k():
    z = _line_logits()
    a = knn_graph(z, 8)  # a[i, j] = 1 iff edge j -> i
    assert torch.equal(a.sum(1), torch.full((10,), 8.0, dtype=a.dtype))  # in-degree exactly 8
    assert torch.equal(a.diagonal(), torch.ones(10, dtype=a.dtype))  # every node is its own neighbour
    assert [set(row.nonzero().flatten().tolist()) for row in a] == ref_neighbours(z.numpy())
    # by hand: the outlier's neighbours are itself and the 7 closest cluster nodes; nobody else picks it
    assert set(a[9].nonzero().flatten().tolist()) == {2, 3, 4, 5, 6, 7, 8, 9}
    assert set(a[0].nonzero().flatten().tolist()) == set(range(8))
    assert a[:, 9].tolist() == [0.0] * 9 + [1.0]  # out-degree 1: directed, not symmetrised
    assert not torch.equal(a, a.t())
    # D_ii = -1: with identical predictions (all D_ij = 0), each node still keeps itself
    same = knn_graph(torch.zeros(10, 3), 8)
    assert torch.equal(same.diagonal(), torch.ones(10)) and torch.equal(same.sum(1), torch.full((10,), 8.0))
    # DGL's D_in^-1/2 A D_in^-1/2 is then the plain mean over N(i), read at the centre i
    h = torch.randn(10, 4, dtype=torch.float64)
    prop = tag_norm(a) @ h
    assert torch.allclose(prop[9], h[2:10].mean(0)) and torch.allclose(prop[0], h[:8].mean(0))


def test_gnn_layer_is_one_hop_tagconv_with_xavier_gain_sqrt2():
    torch.manual_seed(0)
    layer = GraphLayer(128)
    w = layer.linear.weight
    assert w.shape == (128, 256) and layer.linear.bias.shape == (128,)
    assert w.std().item() == pytest.approx(math.sqrt(2) * math.sqrt(2 / (256 + 128)), rel=0.03)
    assert layer.linear.bias.abs().max() <= 1 / math.sqrt(256)  # PyTorch's default bias
    small = GraphLayer(4).double()
    z, h = _line_logits(), torch.randn(10, 4, dtype=torch.float64)
    g = small(h, tag_norm(knn_graph(z, 8)))
    w0, w1, b = small.linear.weight[:, :4], small.linear.weight[:, 4:], small.linear.bias
    for i, nbrs in ((9, range(2, 10)), (0, range(8))):  # g_i = norm(W_0 h_i + W_1 mean_{N(i)} h + b)
        hand = F.normalize(w0 @ h[i] + w1 @ h[list(nbrs)].mean(0) + b, dim=0)
        assert torch.allclose(g[i], hand, atol=1e-12)


def test_full_loss_matches_hkd_md_and_not_its_misreadings():
    """B = 12 >= 8: L_ind + L_hol with the directed graph and the smoothed positives."""
    d = tiny()
    x = inputs(12, seed=2)
    neg = fixed_negatives(x["batch"]["sample_id"])
    ref, _, _ = ref_hkd(d, x, neg)
    wrong = {str(w): ref_hkd(d, x, neg, **w)[0] for w in (
        dict(graph="symmetric"), dict(graph="transposed"), dict(smooth=1.0), dict(smooth=0.0),
        dict(negatives_from="other"), dict(skip_below=13))}
    loss = run(d, x).item()
    assert loss == pytest.approx(ref, rel=1e-9)
    for name, value in wrong.items():
        assert abs(loss - value) > 1e-4 * abs(loss), name


def test_gradients_reach_every_head_and_each_neighbour_through_the_mean():
    d = tiny()
    x = inputs(12, seed=3)
    f_s = x["f_s"].clone().requires_grad_(True)
    x_grad = dict(x, f_s=f_s)
    loss = run(d, x_grad)
    loss.backward()
    assert f_s.grad.abs().sum(1).min() > 0
    for m in (d.embed_s, d.embed_t, d.gnn_s, d.gnn_t):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # the holistic student term alone reaches every neighbour j of i through hbar_i
    d2 = tiny()
    f = x["f_s"].clone().requires_grad_(True)
    e = F.normalize(d2.embed_s.linear(f), dim=1)
    a = tag_norm(knn_graph(x["z_s"], 8))
    g = d2.gnn_s(e, a)
    g[0].sum().backward()
    touched = set(f.grad.abs().sum(1).nonzero().flatten().tolist())
    assert touched == set(a[0].nonzero().flatten().tolist())


# ---------------------------------------------------------------------- §3/§6 bank update and smoothing


def test_bank_update_uses_individual_embeddings_momentum_09_and_smoothing_is_not_written_back():
    d = tiny()
    x = inputs(9, seed=4)
    neg = fixed_negatives(x["batch"]["sample_id"])
    _, ms, mt = ref_hkd(d, x, neg)
    _, ms_g, _ = ref_hkd(d, x, neg, bank_holds="graph")
    _, ms_5, _ = ref_hkd(d, x, neg, momentum=0.5)
    run(d, x)
    assert np.allclose(_np(d.memory.banks["student"]), ms, atol=1e-12)
    assert np.allclose(_np(d.memory.banks["teacher"]), mt, atol=1e-12)
    ids = x["batch"]["sample_id"].numpy()
    assert np.abs(ms_g[ids] - ms[ids]).max() > 1e-3 and np.abs(ms_5[ids] - ms[ids]).max() > 1e-3
    rest = np.setdiff1d(np.arange(N12), ids)
    assert torch.equal(d.memory.banks["student"][rest], torch.from_numpy(ms[rest]))  # other rows unchanged
    assert np.allclose(np.linalg.norm(ms[ids], axis=1), 1)


# ---------------------------------------------------------------------- §7 the B < 8 rule


def test_batches_below_8_use_the_individual_term_only_and_leave_the_banks_alone():
    for b, graph in ((7, False), (8, True)):
        d = tiny()
        x = inputs(b, seed=5)
        neg = fixed_negatives(x["batch"]["sample_id"])
        before = {k: v.clone() for k, v in d.memory.banks.items()}
        ref, ms, _ = ref_hkd(d, x, neg)
        ind_only, _, _ = ref_hkd(d, x, neg, skip_below=10**9)
        loss = run(d, x).item()
        assert loss == pytest.approx(ref, rel=1e-9), b
        assert (abs(loss - ind_only) > 1e-3) == graph, b
        moved = any(not torch.equal(before[k], v) for k, v in d.memory.banks.items())
        assert moved == graph, b
        assert np.allclose(_np(d.memory.banks["student"]), ms, atol=1e-12)
    # through forward(): B = 7 keeps the graph layers in the autograd graph with zero gradient
    d = make(num_samples=64).train()
    sum(d(make_batch(7, seed=6, num_samples=64), 4.0, 0).losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in [*d.gnn_s.parameters(), *d.gnn_t.parameters()])
    assert (d.memory.labels >= 0).sum() == 7  # the labels seen are recorded (bookkeeping, not a bank)


# ---------------------------------------------------------------------- §7 weights


def test_loss_weights_hkd_plus_kd_by_default_and_explicit_values_win():
    d = make(num_samples=64).eval()
    assert (d.gamma, d.alpha, d.beta) == (1.0, 1.0, 3.0)
    d_ref = copy.deepcopy(d)
    batch = make_batch(16, seed=7, num_samples=64)
    out = d(batch, 4.0, 2)
    assert set(out.losses) == {"ce", "kd", "hkd"}
    assert out.losses["ce"].item() == pytest.approx(F.cross_entropy(out.logits, batch["label"]).item(), rel=1e-6)
    assert out.losses["kd"].item() == pytest.approx(kd_kl(out.logits, out.teacher_logits, 4.0).item(), rel=1e-6)
    s_feats, s_logits = d_ref.run_student(batch["image"])
    t_feats, t_logits = d_ref.run_teacher(batch["image"])
    l_hkd = d_ref.extra_loss(s_feats, t_feats, s_logits, t_logits, batch, 4.0, 2).item()
    assert out.losses["hkd"].item() == pytest.approx(3 * l_hkd, rel=1e-6)
    # HKD alone (the README's other row): alpha 0, gamma still HKD's 1
    solo = make(num_samples=64, alpha=0.0)
    assert (solo.gamma, solo.alpha, solo.beta) == (1.0, 0.0, 3.0)
    assert set(solo(batch, 4.0, 0).losses) == {"ce", "hkd"}
    assert (make(num_samples=64, gamma=0.5, alpha=0.3, beta=2.0).gamma,
            make(num_samples=64, alpha=0.3).alpha) == (0.5, 0.3)
    asis = make({"hkd_weights": False}, num_samples=64)
    assert (asis.gamma, asis.alpha, asis.beta) == (0.1, 0.9, 3.0)
    # other methods keep the global KD recipe
    torch.manual_seed(0)
    for method in ("kd", "crd"):
        other = build_distiller(DistillConfig(method=method, options={"nce_k": 8, "feat_dim": 6}), TinyNet(5, 4),
                                TinyNet(5, 6), 5, image_size=8, num_samples=64)
        assert (other.gamma, other.alpha) == (0.1, 0.9), method


# ---------------------------------------------------------------------- the simplified variant


def test_simplified_variant_only_when_asked():
    assert make().variant == "official"
    with pytest.raises(ConfigError, match="distill.options.variant"):
        make({"variant": "paper"})
    off, simp = tiny(), tiny({"variant": "simplified"})
    # B = 8: official uses the graph; simplified needs B > knn, uses other-bank negatives and updates the banks
    x = inputs(8, seed=8)
    neg = fixed_negatives(x["batch"]["sample_id"])
    ref_simp, _, _ = ref_hkd(simp, x, neg, negatives_from="other", skip_below=9)
    ref_off, _, _ = ref_hkd(off, x, neg)
    assert run(off, x).item() == pytest.approx(ref_off, rel=1e-9)
    before = simp.memory.banks["student"].clone()
    assert run(simp, x).item() == pytest.approx(ref_simp, rel=1e-9)
    ids = x["batch"]["sample_id"]
    assert (simp.memory.banks["student"][ids] != before[ids]).any(1).all()
    # B = 12: simplified's symmetric graph without self loops
    off, simp = tiny(), tiny({"variant": "simplified"})
    x = inputs(12, seed=9)
    neg = fixed_negatives(x["batch"]["sample_id"])
    ref_simp, _, _ = ref_hkd(simp, x, neg, negatives_from="other", graph="symmetric")
    ref_off, _, _ = ref_hkd(off, x, neg)
    assert run(simp, x).item() == pytest.approx(ref_simp, rel=1e-9)
    assert run(off, x).item() == pytest.approx(ref_off, rel=1e-9)
    assert abs(ref_simp - ref_off) > 1e-3
    assert abs(ref_simp - ref_hkd(tiny({"variant": "simplified"}), x, neg, negatives_from="other")[0]) > 1e-4


# ---------------------------------------------------------------------- resume and DDP


def test_resumed_run_reproduces_the_next_step():
    d1 = make(num_samples=64, options={"nce_k": 16})
    d1(make_batch(16, seed=10, num_samples=64), 4.0, 0)
    d2 = make(num_samples=64, options={"nce_k": 16}, seed=5, teacher=d1.teacher)  # the teacher is not in the state
    d2.load_state_dict(d1.state_dict())
    nxt = make_batch(16, seed=11, num_samples=64)
    torch.manual_seed(1)
    l1 = d1(nxt, 4.0, 1).losses["hkd"].item()
    torch.manual_seed(2)  # a different global RNG state: the negatives do not use it
    l2 = d2(nxt, 4.0, 1).losses["hkd"].item()
    assert l1 == pytest.approx(l2, rel=1e-6)
    for view in ("student", "teacher"):
        assert torch.allclose(d1.memory.banks[view], d2.memory.banks[view], atol=1e-6)


_DDP_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
torch.set_num_threads(1)
from distill_nets import TinyNet, make_batch
from kcd_ray.config import DistillConfig
from kcd_ray.distill import build_distiller
torch.manual_seed(0)
cfg = DistillConfig(method="hkd", options={"nce_k": 16, "feat_dim": 8})
d = build_distiller(cfg, TinyNet(5, 4), TinyNet(5, 6), 5, image_size=8, num_samples=64).eval()
ddp = DDP(d, find_unused_parameters=d.find_unused_parameters)
batch = make_batch(12, seed=12, num_samples=64)
part = {k: v[rank * 6:(rank + 1) * 6] for k, v in batch.items()}  # 6 per rank < 8, but 12 in all
losses = ddp(part, 4.0, 0).losses
sum(losses.values()).backward()
torch.save({"state": d.state_dict(), "hkd": losses["hkd"].item()}, out)
dist.barrier()  # both ranks done, and the reducer released before its group (see test_distill_zoo's DDP script)
del ddp
dist.destroy_process_group()
"""


def test_ddp_graph_over_the_gathered_batch_and_identical_banks(tmp_path):
    """Two gloo ranks with 6 samples each: the graph spans the 12 (B >= 8), the mean of the two ranks'
    losses is the one-process loss on the whole batch, and both ranks hold the one-process banks."""
    script = tmp_path / "ddp_hkd.py"
    script.write_text(_DDP_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]), OMP_NUM_THREADS="1")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(tmp_path / f"r{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(2))
    torch.manual_seed(0)
    d = build_distiller(DistillConfig(method="hkd", options={"nce_k": 16, "feat_dim": 8}), TinyNet(5, 4),
                        TinyNet(5, 6), 5, image_size=8, num_samples=64).eval()
    whole = d(make_batch(12, seed=12, num_samples=64), 4.0, 0).losses["hkd"].item()
    assert (r0["hkd"] + r1["hkd"]) / 2 == pytest.approx(whole, rel=1e-5)
    assert abs(r0["hkd"] - r1["hkd"]) > 1e-4  # each rank averages over its own anchors
    b0, b1 = r0["state"]["memory._extra_state"], r1["state"]["memory._extra_state"]
    for view in ("student", "teacher"):
        assert torch.equal(b0["banks"][view], b1["banks"][view])
        assert torch.allclose(d.memory.banks[view], b0["banks"][view], atol=1e-6)
    assert torch.equal(d.memory.labels, b0["labels"])
