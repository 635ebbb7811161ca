"""The KD method zoo: every registered distiller trains through ``Distiller.forward(batch, T, epoch)``.

Small nets (tests/distill_nets.py: student and teacher of different widths, so connectors are
exercised), 8x8 images, small memory banks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_nets import TinyNet, make_batch
from kcd_ray.config import ConfigError, DistillConfig
from kcd_ray.distill import DISTILLERS, build_distiller, kd_kl
from kcd_ray.distill.logit_kd import dkd_terms

N = 64  # training-set size for memory banks
SMALL = {"nce_k": 16, "feat_dim": 16, "knn": 4}
ALL = [m for m in DISTILLERS.names() if m not in ("ed", "mtkd")]  # several teachers: tests/test_ed.py
STAGED = ["ab", "fsp", "ft"]
HAS_OWN_TERM = [m for m in ALL if m not in ("ce", "kd", "ab", "fsp")]  # AB/FSP: init stage only by default


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(method, *, seed=0, teacher=True, options=None, teacher_net=None, **cfg_kw):
    torch.manual_seed(seed)
    student, t = TinyNet(5, width=4), TinyNet(5, width=6)
    if teacher_net is not None:
        t = teacher_net
    opts = dict(SMALL)
    opts.update(options or {})
    cfg = DistillConfig(method=method, options=opts, **cfg_kw)
    return build_distiller(cfg, student, t if teacher else None, 5, image_size=8, num_samples=N)


def own_params(d):
    return {n: p for n, p in d.named_parameters() if not n.startswith("student.")}


def total(out):
    return sum(out.losses.values())


# ------------------------------------------------------------------ every method


@pytest.mark.parametrize("method", ALL)
def test_every_method_step_is_finite_and_reaches_student_and_own_modules(method):
    d = make(method, teacher=method != "ce").train()
    batch = make_batch(16, seed=1, num_samples=N)
    assert set(batch) == {"image", "label", "sample_id"}
    out = d(batch, 4.0, 30)
    loss = total(out)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in out.losses.values())
    if method in HAS_OWN_TERM:
        assert method in out.losses and out.losses[method].abs() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    used = own_params(d)
    if method == "ft":  # the paraphraser is trained in the init stage only
        used = {n: p for n, p in used.items() if not n.startswith("paraphraser.")}
    if method in ("ab", "fsp"):
        used = {}
    for name, p in used.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert not used or any(p.grad.abs().sum() > 0 for p in used.values())


@pytest.mark.parametrize("method", [m for m in ALL if m not in ("ce", "kd")])
def test_method_term_falls_on_a_fixed_batch(method):
    """Only the method's own term (gamma = alpha = 0, beta = 1): Adam evens out the very different
    loss scales. AB and FSP are checked with their distillation-stage term switched on."""
    d = make(method, gamma=0.0, alpha=0.0, beta=1.0, options={"distill_stage": True}).train()
    batch = make_batch(16, seed=2, num_samples=N)
    opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=0.03)
    values = []
    for _ in range(12):
        loss = total(d(batch, 4.0, 30))
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[-1] < 0.97 * values[0], values


def test_ce_loss_falls_without_teacher():
    d = make("ce", teacher=False).train()
    batch = make_batch(16, seed=3)
    opt = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(10):
        loss = total(d(batch, 4.0, 0))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.85 * first


@pytest.mark.parametrize("method", [m for m in ALL if m not in ("ce", "kd", "logit_match", "dkd")])
def test_connectors_are_checkpointed_with_the_distiller(method):
    d1 = make(method, seed=0)
    d2 = make(method, seed=5, teacher_net=d1.teacher)  # the teacher is not part of the state dict
    batch = make_batch(16, seed=4, num_samples=N)
    d1(batch, 4.0, 30)  # fills memory banks / Z where the method has them
    d2.load_state_dict(d1.state_dict())
    d1.eval(), d2.eval()
    torch.manual_seed(7)
    l1 = {k: v.item() for k, v in d1(batch, 4.0, 30).losses.items()}
    torch.manual_seed(7)
    l2 = {k: v.item() for k, v in d2(batch, 4.0, 30).losses.items()}
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert all(not k.startswith("teacher") for k in d1.state_dict())


def test_zero_beta_leaves_the_term_out_and_flags_unused_parameters():
    d = make("fitnet", beta=0.0)
    assert set(d(make_batch(), 4.0, 0).losses) == {"ce", "kd"}
    assert d.find_unused_parameters
    assert not make("fitnet").find_unused_parameters
    assert not make("kd").find_unused_parameters


# ------------------------------------------------------------------ two-stage methods


@pytest.mark.parametrize("method", STAGED)
def test_init_stage_losses_fall_and_train_the_right_modules(method):
    d = make(method, init_epochs=7).train()
    assert d.init_stage_epochs() == 7 and d.find_unused_parameters
    params = d.init_stage_parameters()
    ids = {id(p) for p in params}
    if method == "ft":
        assert ids == {id(p) for p in d.paraphraser.parameters()}
    else:
        assert {id(p) for p in d.student.parameters()} <= ids
        assert {id(p) for p in own_params(d).values()} <= ids
    batch = make_batch(16, seed=5)
    opt = torch.optim.Adam(params, lr=0.01)
    values = []
    for _ in range(12):
        out = d(batch, 4.0, 0, init_stage=True)
        assert out.logits is None and set(out.losses) == {f"{method}_init"}
        loss = total(out)
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[-1] < 0.9 * values[0], values


def test_methods_without_init_stage_refuse_init_losses():
    d = make("kd")
    assert d.init_stage_epochs() == 0
    with pytest.raises(ValueError, match="has no initialisation stage"):
        d(make_batch(), 4.0, 0, init_stage=True)


# ------------------------------------------------------------------ logit methods


def test_logit_matching_is_the_high_temperature_limit_of_kd():
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(6, 10, generator=g, dtype=torch.float64) * 2
    z_s0 = torch.randn(6, 10, generator=g, dtype=torch.float64) * 2
    z_t, z_s0 = z_t - z_t.mean(1, keepdim=True), z_s0 - z_s0.mean(1, keepdim=True)  # zero-mean logits
    d = make("logit_match", gamma=0.0, alpha=0.0, beta=1.0)

    def grad(fn):
        z_s = z_s0.clone().requires_grad_(True)
        fn(z_s).backward()
        return z_s.grad

    g_lm = grad(lambda z: d.extra_loss(None, None, z, z_t, {}, 1.0, 0))
    manual = (z_s0 - z_t) / (z_s0.shape[1] * z_s0.shape[0])  # d/dz of mean_i (1/2C)||z_s - z_t||^2
    assert torch.allclose(g_lm, manual, rtol=1e-10)
    # kd_kl is T^2 * KL, so its gradient is already T^2 * dKD/dz; the gap shrinks like 1/T
    err = {T: ((grad(lambda z: kd_kl(z, z_t, T)) - g_lm).norm() / g_lm.norm()).item()  # noqa: B023 - called at once
           for T in (1.0, 100.0, 1000.0)}
    assert err[1000.0] < 0.01
    assert err[1000.0] < err[100.0] / 5 and err[100.0] < err[1.0] / 5


def test_dkd_decomposition_identity():
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(8, 7, generator=g, dtype=torch.float64) * 3
    z_t = torch.randn(8, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (8,), generator=g)
    for T in (1.0, 4.0):
        tckd, nckd = dkd_terms(z_s, z_t, y, T, reduction="none")
        p_t = torch.softmax(z_t / T, dim=1)[torch.arange(8), y]
        kl = (torch.softmax(z_t / T, 1) * (torch.log_softmax(z_t / T, 1) - torch.log_softmax(z_s / T, 1))).sum(1)
        assert torch.allclose(tckd + (1 - p_t) * nckd, kl, rtol=1e-9)
        assert (tckd > 0).all() and (nckd > 0).all()
        assert (kd_kl(z_s, z_t, T) / T**2).item() == pytest.approx(kl.mean().item(), rel=1e-9)


def test_dkd_weights_and_warmup():
    batch = make_batch(16, seed=6)
    d = make("dkd", gamma=0.0, alpha=0.0, beta=2.0, options={"dkd_alpha": 1.5, "dkd_beta": 8.0, "warmup": 20})
    d.eval()
    out = d(batch, 4.0, 40)
    tckd, nckd = dkd_terms(out.logits, out.teacher_logits, batch["label"], 4.0)
    assert out.losses["dkd"].item() == pytest.approx(2.0 * 16 * (1.5 * tckd + 8.0 * nckd).item(), rel=1e-5)
    early = d(batch, 4.0, 0).losses["dkd"].item()
    assert early == pytest.approx(out.losses["dkd"].item() / 20, rel=1e-5)  # first epoch: 1/warmup


# ------------------------------------------------------------------ CRD / HKD memory banks


@pytest.mark.parametrize("method", ["crd", "hkd"])
def test_memory_bank_needs_num_samples_and_checks_ids(method):
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="distill.options.num_samples"):
        build_distiller(DistillConfig(method=method, options=dict(SMALL)), TinyNet(5, 4), TinyNet(5, 6), 5,
                        image_size=8)
    d = make(method)
    batch = make_batch(16)
    batch["sample_id"] = batch["sample_id"] + N
    with pytest.raises(ValueError, match="batch.sample_id"):
        d(batch, 4.0, 0)


@pytest.mark.parametrize("method", ["crd", "hkd"])
def test_memory_bank_rows_follow_original_sample_ids(method):
    """Condensed/blended epochs feed a sparse subset of original ids: only those rows move."""
    d = make(method)
    bank = d.crd.memory if method == "crd" else d.memory
    before = {k: v.clone() for k, v in bank.banks.items()}
    batch = make_batch(16, seed=8)
    batch["sample_id"] = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 63])
    d(batch, 4.0, 0)
    for k, v in bank.banks.items():
        changed = (v != before[k]).any(1).nonzero().flatten()
        assert changed.tolist() == sorted(batch["sample_id"].tolist())
        assert torch.allclose(v[changed].norm(dim=1), torch.ones(len(changed)), atol=1e-5)
    assert (bank.labels[batch["sample_id"]] == batch["label"]).all()
    assert (bank.labels[[0, 1, 2]] == -1).all()


def test_crd_negatives_avoid_the_anchor_and_its_class():
    d = make("crd", options={"nce_k": 32})
    mem = d.crd.memory
    mem.labels.copy_(torch.arange(N) % 5)  # every sample's label known
    ids = torch.arange(0, 40, 5)
    labels = ids % 5
    neg = mem.sample_negatives(ids, labels, 32)
    assert neg.shape == (8, 32)
    assert (neg != ids[:, None]).all()
    assert (mem.labels[neg] != labels[:, None]).float().mean() > 0.99


_DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
torch.set_num_threads(1)
from distill_nets import TinyNet, make_batch
from kcd_ray.config import DistillConfig
from kcd_ray.distill import build_distiller
torch.manual_seed(0)
cfg = DistillConfig(method="crd", options={"nce_k": 16, "feat_dim": 16})
d = build_distiller(cfg, TinyNet(5, 4), TinyNet(5, 6), 5, image_size=8, num_samples=64).eval()
ddp = DDP(d, find_unused_parameters=d.find_unused_parameters)
batch = make_batch(16, seed=9, num_samples=64)
part = {k: v[rank * 8:(rank + 1) * 8] for k, v in batch.items()}
sum(ddp(part, 4.0, 0).losses.values()).backward()
torch.save({"state": d.state_dict(), "grad": d.crd.embed_s.linear.weight.grad}, out)
# Both ranks done, and the DDP reducer released before its process group: tearing the group down under a live
# reducer (or while the other rank still talks to it) can abort at exit ("terminate called without an active
# exception", seen once in CI).
dist.barrier()
del ddp
dist.destroy_process_group()
"""


def test_crd_memory_bank_under_ddp_matches_one_process(tmp_path):
    """Two gloo ranks, each with half a batch: after one DDP step both hold the same bank, equal to
    the bank one process gets from the whole batch (eval mode: embeddings don't depend on the split)."""
    script = tmp_path / "ddp_crd.py"
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
    bank0, bank1 = r0["state"]["crd.memory._extra_state"], r1["state"]["crd.memory._extra_state"]
    for view in ("student", "teacher"):
        assert torch.equal(bank0["banks"][view], bank1["banks"][view])
    assert torch.equal(r0["state"]["crd._extra_state"]["z"], r1["state"]["crd._extra_state"]["z"])
    assert torch.allclose(r0["grad"], r1["grad"])  # DDP averaged the gradients

    d = make("crd").eval()
    d(make_batch(16, seed=9, num_samples=N), 4.0, 0)
    for view in ("student", "teacher"):
        assert torch.allclose(d.crd.memory.banks[view], bank0["banks"][view], atol=1e-6)
    assert torch.equal(d.crd.memory.labels, bank0["labels"])


# ------------------------------------------------------------------ real architectures


def test_connectors_bridge_real_zoo_architectures():
    models = pytest.importorskip("kcd_ray.models")
    torch.manual_seed(0)
    teacher, student = models.build_model("vgg8", 10), models.build_model("resnet8", 10)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.randint(0, 10, (4,)), "sample_id": torch.arange(4)}
    for method in ("fitnet", "vid", "kdsvd", "fsp", "ab", "ft", "crd", "cc"):
        d = build_distiller(DistillConfig(method=method, options={"nce_k": 8, "feat_dim": 8, "distill_stage": True}),
                            student, teacher, 10, num_samples=10).train()
        out = d(batch, 4.0, 0)
        assert method in out.losses and torch.isfinite(total(out)), method
        total(out).backward()
        student.zero_grad()


# ------------------------------------------------------------------ options


def test_option_errors_name_the_key():
    with pytest.raises(ConfigError, match="distill.options: unknown option.*nce_kk"):
        make("crd", options={"nce_kk": 5})
    with pytest.raises(ConfigError, match="distill.options.nce_k: expected int"):
        make("crd", options={"nce_k": "many"})
    with pytest.raises(ConfigError, match="distill.options.knn.*> 0"):
        make("hkd", options={"knn": 0})
    with pytest.raises(ConfigError, match="distill.options.negatives"):
        make("crd", options={"negatives": "nearest"})
    with pytest.raises(ConfigError, match="distill.options.hint_layer"):
        make("fitnet", options={"hint_layer": 9})
    # another method's option is tolerated (a sweep may switch methods and keep its options)
    assert make("kd", options={"nce_k": 5}).options["nce_k"] == 5


def test_hkd_short_batch_uses_individual_term_and_keeps_graph_layers_in_the_graph():
    d = make("hkd", options={"knn": 4}).train()
    batch = make_batch(3, seed=11, num_samples=N)  # fewer samples than knn (HKD's B < 8 rule): no instance graph
    loss = total(d(batch, 4.0, 0))
    loss.backward()
    grads = [p.grad for p in [*d.gnn_s.parameters(), *d.gnn_t.parameters()]]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)
    assert d.embed_s.linear.weight.grad.abs().sum() > 0
