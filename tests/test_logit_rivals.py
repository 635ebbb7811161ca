"""Logit standardization (Sun et al., CVPR 2024) and CTKD's learned temperature (Li et al., AAAI 2023).

Each is checked against its reference code, transcribed below (citing repository and file), on fixed tensors:
losses and gradients. Then how they compose: the selection strategies' per-sample losses, checkpoints, and short
in-process engine runs (no Ray).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from distill_nets import TinyNet, make_batch
from engine_harness import config, feeds, make_engine, prepare_tiny
from kcd_ray.config import ConfigError, DistillConfig, TemperatureConfig, describe, load_config
from kcd_ray.distill import build_distiller, build_temperature, kd_kl
from kcd_ray.distill.temperature import CurriculumTemperature, ctkd_lambda, reverse_gradient
from kcd_ray.engine.selection import InfoBatch, UnixKD, per_sample_loss
from kcd_ray.models import build_model, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- transcribed reference code
# github.com/sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py (normalize, kd_loss) and
# mdistiller/distillers/DKD.py (dkd_loss, _get_gt_mask, _get_other_mask, cat_mask); F.kl_div's deprecated
# size_average=False is reduction="sum".


def ref_normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def ref_kd_loss(logits_student_in, logits_teacher_in, temperature, logit_stand):
    logits_student = ref_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = ref_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature**2
    return loss_kd


def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def _get_other_mask(logits, target):
    target = target.reshape(-1)
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)


def ref_dkd_loss(logits_student_in, logits_teacher_in, target, alpha, beta, temperature, logit_stand):
    logits_student = ref_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = ref_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * (temperature**2)
                 / target.shape[0])
    return alpha * tckd_loss + beta * nckd_loss


# github.com/zhengli97/CTKD: models/temp_global.py (GradientReversalFunction, Global_T), train_student.py
# (CosineDecay), distiller_zoo/KD.py (DistillKL, without .cuda()), helper/loops.py (temp = t_start + t_end *
# sigmoid(mlp_net(...)), with --t_start 1 --t_end 20 and --decay_max 0 --decay_min -1 --decay_loops 10).


class RefGradientReversalFunction(Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        lambda_ = grads.new_tensor(ctx.lambda_)
        return lambda_ * grads, None


class RefGlobalT(nn.Module):
    def __init__(self):
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)

    def forward(self, fake_input1, fake_input2, lambda_):
        return RefGradientReversalFunction.apply(self.global_T, lambda_)


class RefCosineDecay:
    def __init__(self, max_value, min_value, num_loops):
        self._max_value, self._min_value, self._num_loops = max_value, min_value, num_loops

    def get_value(self, i):
        if i < 0:
            i = 0
        if i >= self._num_loops:
            i = self._num_loops
        value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5
        return value * (self._max_value - self._min_value) + self._min_value


def ref_distill_kl(y_s, y_t, T):
    return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1)) * T * T


# --------------------------------------------------------------------------- helpers


def logits(seed, n=8, c=7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale + torch.randn(n, 1, generator=g) * 2


def grads(loss_fn, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    loss = loss_fn(*xs)
    return loss.detach(), torch.autograd.grad(loss, xs)


def pair(seed=0, classes=5):
    torch.manual_seed(seed)
    return TinyNet(classes, width=4), TinyNet(classes, width=6)


def ctkd_cfg(**kw) -> TemperatureConfig:
    return TemperatureConfig(schedule="ctkd", **kw)


# --------------------------------------------------------------------------- logit standardization


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_standardized_kd_matches_the_reference_forward_and_backward(T):
    s, t = logits(0), logits(1)
    for stand in (True, False):
        # grads() calls each lambda at once, inside this iteration
        ours, g_ours = grads(lambda a: kd_kl(a, t, T, standardize=stand), s)  # noqa: B023
        ref, g_ref = grads(lambda a: ref_kd_loss(a, t, T, stand), s)  # noqa: B023
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_ours[0], g_ref[0], rtol=1e-5, atol=1e-7)
    # what the z-score buys: the KD term ignores each sample's logit scale and shift
    a = torch.rand(8, 1) * 3 + 0.5
    assert kd_kl(a * s + 5 * torch.randn(8, 1), t, T, standardize=True).item() == pytest.approx(
        kd_kl(s, t, T, standardize=True).item(), rel=1e-4)
    assert kd_kl(2 * s, t, T).item() != pytest.approx(kd_kl(s, t, T).item(), rel=1e-2)


def test_kd_distiller_with_standardization_is_the_reference_recipe():
    """kd with the reference's recipe (CE 0.1, KD weight 9, T 2): losses and the student's gradients."""
    student, teacher = pair()
    d = build_distiller(DistillConfig(method="kd", gamma=0.1, alpha=9.0, logit_standardize=True), student, teacher, 5)
    batch = make_batch(8, seed=3)
    out = d(batch, 2.0, 0)
    ours = sum(out.losses.values())
    g_ours = torch.autograd.grad(ours, list(student.parameters()))
    z_s = student(batch["image"])
    with torch.no_grad():
        z_t = teacher(batch["image"])
    ref = 0.1 * F.cross_entropy(z_s, batch["label"]) + 9.0 * ref_kd_loss(z_s, z_t, 2.0, True)
    g_ref = torch.autograd.grad(ref, list(student.parameters()))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stand", [True, False])
def test_dkd_matches_the_reference_forward_and_backward(stand):
    """dkd with the reference's standardized recipe (T 2, dkd_alpha 9, dkd_beta 72, warmup 20, 0-based epoch 4 =
    the reference's epoch 5)."""
    s, t = logits(4, n=10, c=6), logits(5, n=10, c=6)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    student, teacher = pair(classes=6)
    d = build_distiller(DistillConfig(method="dkd", gamma=1.0, alpha=0.0, logit_standardize=stand,
                                      options={"dkd_alpha": 9.0, "dkd_beta": 72.0, "warmup": 20}), student, teacher, 6)
    ours, g_ours = grads(lambda a: d.extra_loss(None, None, a, t, {"label": y}, 2.0, 4).mean(), s)
    ref, g_ref = grads(lambda a: min(5 / 20, 1.0) * ref_dkd_loss(a, t, y, 9.0, 72.0, 2.0, stand), s)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours[0], g_ref[0], rtol=1e-4, atol=1e-6)


def test_ed_refuses_logit_standardization():
    from kcd_ray.data.groups import ClassGroups

    cfg = load_config(overrides=["curriculum.name=ed", "distill.method=ed", "distill.logit_standardize=true"])
    groups = ClassGroups.from_config(cfg.curriculum, 10)
    teachers = [build_model("resnet8", n) for n in groups.sizes]
    with pytest.raises(ConfigError, match="distill.logit_standardize: method 'ed' does not support it"):
        build_distiller(cfg.distill, build_model("resnet8", 10), teachers, 10, groups=groups, curriculum=cfg.curriculum)


# --------------------------------------------------------------------------- CTKD


def test_ctkd_lambda_ramp_is_the_reference_cosine_decay():
    ref = RefCosineDecay(max_value=0, min_value=-1, num_loops=10)
    got = [ctkd_lambda(e, 0.0, 1.0, 10) for e in range(14)]
    assert got == pytest.approx([-ref.get_value(e + 1) for e in range(14)], abs=1e-12)  # epoch 0 = its epoch 1
    assert got[0] == pytest.approx((1 - math.cos(math.pi / 10)) / 2) and got[4] == pytest.approx(0.5)
    assert got[9:] == [1.0] * 5 and all(b > a for a, b in zip(got, got[1:10]))
    assert ctkd_lambda(3, 0.2, 0.8, 0) == 0.8  # no ramp: the end value at once
    half = RefCosineDecay(max_value=-0.2, min_value=-0.8, num_loops=4)
    assert [ctkd_lambda(e, 0.2, 0.8, 4) for e in range(6)] == pytest.approx([-half.get_value(e + 1) for e in range(6)])


def test_gradient_reversal_sign():
    x = torch.tensor(0.7, requires_grad=True)
    for lam in (0.0, 0.25, 1.0):
        (g,) = torch.autograd.grad(3.0 * reverse_gradient(x, lam) ** 2, x)
        assert g.item() == pytest.approx(-lam * 6.0 * 0.7)
    y = reverse_gradient(x, 0.5)
    assert y.item() == x.item() and y is not x  # identity forward


@pytest.mark.parametrize("epoch", [0, 3, 12])
def test_ctkd_temperature_matches_the_reference_forward_and_backward(epoch):
    s, t = logits(6), logits(7)
    lam_ref = RefCosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(epoch + 1)
    ref_t = RefGlobalT()
    s_ref = s.clone().requires_grad_(True)
    T_ref = 1 + 20 * torch.sigmoid(ref_t(t, s_ref, lam_ref))
    loss_ref = ref_distill_kl(s_ref, t, T_ref).sum()
    loss_ref.backward()

    ours = build_temperature(ctkd_cfg(), 240)
    assert isinstance(ours, CurriculumTemperature) and ours.value() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    s_ours = s.clone().requires_grad_(True)
    T = ours(epoch)
    assert T.shape == () and T.item() == pytest.approx(T_ref.item(), rel=1e-6)
    loss = kd_kl(s_ours, t, T)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-5, atol=1e-7)
    assert ours.theta.grad.item() == pytest.approx(ref_t.global_T.grad.item(), rel=1e-4, abs=1e-9)
    assert ours.theta.grad.item() != 0.0


def test_ctkd_temperature_ascends_the_kd_loss_the_student_descends():
    """One SGD step on theta (through the reversal) raises the KD loss; one on the student's logits lowers it."""
    s, t = logits(8), logits(9)
    temp = CurriculumTemperature(ctkd_cfg(ctkd_init=-1.0))
    s = s.requires_grad_(True)
    before = kd_kl(s, t, temp(20)).item()
    kd_kl(s, t, temp(20)).backward()
    with torch.no_grad():
        temp.theta -= 0.5 * temp.theta.grad
        s_next = s - 0.5 * s.grad
    assert kd_kl(s.detach(), t, temp.value()).item() > before  # theta moved to a harder temperature
    assert kd_kl(s_next, t, temp.value()).item() < kd_kl(s.detach(), t, temp.value()).item()


def test_ctkd_is_a_trained_checkpointed_submodule_of_the_distiller():
    student, teacher = pair()
    d = build_distiller(DistillConfig(method="kd"), student, teacher, 5)
    sched = d.bind_temperature(build_temperature(ctkd_cfg(), 10))
    assert "learned_temperature.theta" in d.state_dict()
    assert any(p is d.learned_temperature.theta for p in d.parameters())  # the optimiser gets it
    assert not d.find_unused_parameters  # used by every step's KD term
    with torch.no_grad():
        d.learned_temperature.theta.fill_(-0.3)
    assert sched(5) == pytest.approx(1 + 20 / (1 + math.exp(0.3)), rel=1e-6)
    out = d(make_batch(), 4.0, 5)  # the engine's T is replaced by the learned one
    torch.testing.assert_close(out.losses["kd"], 0.9 * kd_kl(out.logits, out.teacher_logits, sched(5)))
    fresh = build_distiller(DistillConfig(method="kd"), *pair(1), 5)
    fresh.bind_temperature(build_temperature(ctkd_cfg(), 10))
    fresh.load_state_dict(d.state_dict())
    assert fresh.learned_temperature.value() == d.learned_temperature.value() != pytest.approx(15.62, abs=0.1)
    # teacher training keeps a ctkd config working (no KD term: nothing learned); a method without a T term refuses
    ce = build_distiller(DistillConfig(method="ce"), pair()[0], None, 5)
    assert ce.bind_temperature(build_temperature(ctkd_cfg(), 10))(0) == pytest.approx(15.62, abs=0.01)
    assert ce.learned_temperature is None and "learned_temperature.theta" not in ce.state_dict()
    fit = build_distiller(DistillConfig(method="fitnet", alpha=0.0), *pair(), 5, image_size=8)
    with pytest.raises(ConfigError, match="distill.temperature.schedule: ctkd .*'fitnet' with distill.alpha=0"):
        fit.bind_temperature(build_temperature(ctkd_cfg(), 10))


# --------------------------------------------------------------------------- the selection strategies' losses


def _bound(method="kd", **kw):
    student, teacher = pair()
    d = build_distiller(DistillConfig(method=method, logit_standardize=True, **kw), student, teacher, 5)
    d.bind_temperature(build_temperature(ctkd_cfg(ctkd_init=0.2), 10))
    return d


def test_infobatch_reweights_the_standardized_kd_at_the_learned_temperature():
    d = _bound()
    batch = make_batch(8, seed=11, num_samples=8)
    batch["sample_id"] = batch["sample_id_cpu"] = torch.arange(8)
    out = d(batch, 4.0, 3)
    T = d.learned_temperature.value()
    l_i = per_sample_loss(out)
    hand = (0.1 * F.cross_entropy(out.logits, batch["label"], reduction="none")
            + 0.9 * T * T * F.kl_div(F.log_softmax(ref_normalize(out.logits) / T, 1),
                                     F.softmax(ref_normalize(out.teacher_logits) / T, 1), reduction="none").sum(1))
    torch.testing.assert_close(l_i, hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_i.mean(), sum(out.losses.values()))
    hook = InfoBatch(load_config(overrides=["selection.infobatch.ratio=0.5", "optim.epochs=8"]), 8)
    w = torch.tensor([1, 2, 1, 2, 1, 1, 2, 1], dtype=torch.float32)
    hook._w_dev = w
    loss = hook.adjust_loss(SimpleNamespace(distiller=d), batch, out, sum(out.losses.values()))
    params = [d.learned_temperature.theta] + list(d.student.parameters())
    g = torch.autograd.grad(loss, params, retain_graph=True)
    g_ref = torch.autograd.grad((w * l_i).mean(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert g[0].abs().item() > 0  # the reweighted KD reaches the temperature


def test_dkd_term_is_per_sample_for_infobatch():
    d = build_distiller(DistillConfig(method="dkd", gamma=1.0, alpha=0.0, logit_standardize=True), *pair(), 5)
    batch = make_batch(8, seed=12)
    out = d(batch, 2.0, 30)
    assert set(out.per_sample) == {"ce", "dkd"} and out.per_sample["dkd"].shape == (8,)
    torch.testing.assert_close(per_sample_loss(out).mean(), sum(out.losses.values()))
    ref = ref_dkd_loss(out.logits, out.teacher_logits, batch["label"], 1.0, 8.0, 2.0, True)
    torch.testing.assert_close(out.losses["dkd"], ref, rtol=1e-5, atol=1e-6)


def test_every_method_gives_its_per_sample_terms():
    """StepOutput.per_sample: CE and KD for every method (dkd's own term too), each with the batch mean its loss is."""
    from test_distill_zoo import ALL, N, make

    for method in ALL:
        d = make(method, teacher=method != "ce")
        out = d(make_batch(16, seed=1, num_samples=N), 4.0, 30)
        want = {"ce"} if method == "ce" else {"ce", "kd", "dkd"} if method == "dkd" else {"ce", "kd"}
        assert set(out.per_sample) == want, method
        for k, v in out.per_sample.items():
            assert v.shape == (16,) and torch.allclose(v.mean(), out.losses[k]), (method, k)


def test_unixkd_mixed_ce_plus_the_standardized_kd_of_the_mixed_images():
    d = _bound(gamma=0.5)
    hook = UnixKD(load_config(overrides=["selection.strategy=unixkd", "optim.batch_size=8"]), 8)
    engine = SimpleNamespace(distiller=d, parts=SimpleNamespace(amp_ctx=nullcontext()), ctx=SimpleNamespace(rank=0))
    hook.before_epoch(engine, 0)
    batch = make_batch(8, seed=13, num_samples=8)
    batch["sample_id_cpu"] = batch["sample_id"]
    mixed = hook.before_step(engine, batch)
    out = d(mixed, 4.0, 0)
    loss = hook.adjust_loss(engine, mixed, out, sum(out.losses.values()))
    m, z = mixed["mix_weight"], out.logits
    with torch.no_grad():
        z_t = d.teacher(mixed["image"])
    T = d.learned_temperature.value()
    ref = (0.5 * ((1 - m) * F.cross_entropy(z, mixed["label"], reduction="none")
                  + m * F.cross_entropy(z, mixed["mix_label"], reduction="none")).mean()
           + 0.9 * ref_kd_loss(z, z_t, T, True))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- config and sweeps


def test_config_list_and_sweep_space_carry_the_new_knobs():
    from kcd_ray.sweeps.space import parse_space

    keys = {k: h for k, _, _, h in describe()}
    for k in ("distill.logit_standardize", "distill.temperature.ctkd_T_min", "distill.temperature.ctkd_T_span",
              "distill.temperature.ctkd_init", "distill.temperature.ctkd_lambda_start",
              "distill.temperature.ctkd_lambda_end", "distill.temperature.ctkd_ramp_epochs"):
        assert keys[k], k  # listed, with help
    assert "ctkd" in keys["distill.temperature.schedule"]
    dims = parse_space({"distill.logit_standardize": [True, False],
                        "distill.temperature.schedule": ["constant", "ctkd"],
                        "distill.temperature.ctkd_ramp_epochs": {"randint": [2, 20]}}, {})
    assert [d.key for d in dims] == ["distill.logit_standardize", "distill.temperature.schedule",
                                     "distill.temperature.ctkd_ramp_epochs"]
    with pytest.raises(ConfigError, match="distill.temperature.ctkd_T_span"):
        parse_space({"distill.temperature.ctkd_T_span": [5.0, -1.0]}, {})


# --------------------------------------------------------------------------- engine runs (no Ray)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rivals")
    torch.manual_seed(1)
    teacher = save_model(root / "teacher.pt", build_model("resnet8", 4))
    base = {"model": "resnet8",
            "data": {"name": "synthetic", "root": str(root / "data"),
                     "synthetic": {"num_train": 64, "num_test": 32, "num_classes": 4, "image_size": 8}},
            "optim": {"epochs": 2, "batch_size": 16, "lr": 0.05, "scheduler": "cosine", "threads": 1},
            "scaling": {"num_workers": 0}, "run": {"verbose": 0}, "distill": {"teacher": str(teacher)},
            "kcd": {"interval": 1, "stages": 1, "rho": 0.5}}
    return prepare_tiny(root, base)


@pytest.mark.parametrize("strategy", ["none", "kcd", "infobatch", "unixkd", "random"])
def test_kd_with_standardization_and_ctkd_runs_with_every_strategy(tiny, tmp_path, strategy):
    cfg = config(tiny, **{"selection.strategy": strategy, "distill.logit_standardize": True,
                          "distill.alpha": 9.0, "distill.temperature.schedule": "ctkd",
                          "distill.temperature.ctkd_ramp_epochs": 2})
    engine = make_engine(tiny, tmp_path / "run", cfg)
    theta0 = engine.distiller.learned_temperature.theta.item()
    assert any(p is engine.distiller.learned_temperature.theta for p in engine.parts.params)
    engine.run(*feeds(tiny, engine))
    rows = engine.history
    assert all(math.isfinite(r["train_loss"]) and r["loss_kd"] > 0 for r in rows)
    assert engine.distiller.learned_temperature.theta.item() != theta0  # trained
    assert rows[-1]["T"] == pytest.approx(engine.distiller.learned_temperature.value())  # the T column: learned
    assert rows[0]["T"] != rows[1]["T"] and 1.0 < rows[0]["T"] < 21.0
    if strategy in ("kcd", "random", "infobatch"):
        assert rows[-1]["kept_fraction"] < 1.0


def test_ctkd_temperature_is_resumed_from_the_run_checkpoint(tiny, tmp_path):
    cfg = config(tiny, **{"distill.temperature.schedule": "ctkd", "kcd.enabled": False})
    engine = make_engine(tiny, tmp_path / "run", cfg)
    engine.run(*feeds(tiny, engine))
    again = make_engine(tiny, tmp_path / "run", cfg)
    assert again.distiller.learned_temperature.value() == pytest.approx(15.62, abs=0.01)
    again.restore(engine.services.latest_checkpoint())
    assert again.distiller.learned_temperature.theta.item() == engine.distiller.learned_temperature.theta.item()
    assert again.parts.temperature(2) == engine.history[-1]["T"]
    theta = again.distiller.learned_temperature.theta
    assert again.optimizer.state[theta]["momentum_buffer"].item() != 0.0  # its SGD state came back too


def test_dkd_with_standardization_runs_with_kcd(tiny, tmp_path):
    cfg = config(tiny, **{"distill.method": "dkd", "distill.gamma": 1.0, "distill.alpha": 0.0,
                          "distill.logit_standardize": True, "distill.temperature.T": 2.0,
                          "distill.options": {"dkd_alpha": 9.0, "dkd_beta": 72.0, "warmup": 1}})
    engine = make_engine(tiny, tmp_path / "run", cfg)
    engine.run(*feeds(tiny, engine))
    assert [r["kept_fraction"] for r in engine.history] == [1.0, 0.5]
    assert all(math.isfinite(r["loss_dkd"]) and r["loss_dkd"] > 0 for r in engine.history)


def test_offline_kd_values_with_ctkd_need_a_fixed_value_temperature(tiny, tmp_path):
    cfg = config(tiny, **{"distill.temperature.schedule": "ctkd", "kcd.estep": "offline", "kcd.value_fn": "kd"})
    with pytest.raises(ConfigError, match="kcd.value_T: the offline E-step's kd values"):
        make_engine(tiny, tmp_path / "run", cfg)
    make_engine(tiny, tmp_path / "ok", config(tiny, **{"distill.temperature.schedule": "ctkd", "kcd.estep": "offline",
                                                        "kcd.value_fn": "kd", "kcd.value_T": 4.0}))


def test_ctkd_temperature_under_ddp_is_the_big_batch_temperature(tmp_path):
    """Two DDP ranks train the same theta as one process on their batches together (DDP synchronises it)."""
    import torch.multiprocessing as mp

    from ctkd_ddp import batches, ctkd_distiller, ddp_worker, train_theta

    mp.spawn(ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt")["theta"] for r in (0, 1))
    both = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(batches(0), batches(1))]
    single = train_theta(ctkd_distiller(), both)
    assert r0 == r1 and r0 == pytest.approx(single, rel=1e-5, abs=1e-6) and single != 1.0
