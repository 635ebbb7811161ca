"""Distiller interface, CE/KD losses and temperature schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill_nets import TinyNet, make_batch
from kcd_ray.config import ConfigError, DistillConfig, TemperatureConfig, load_config
from kcd_ray.distill import DISTILLERS, build_distiller, build_temperature, default_beta, kd_kl


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(seed=0, num_classes=5):
    torch.manual_seed(seed)
    return TinyNet(num_classes, width=4), TinyNet(num_classes, width=6)


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _hand_kd(s, t, T):
    """T^2 * mean_i sum_c p_t (log p_t - log p_s) in float64 numpy."""
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    log_ps, log_pt = _np_log_softmax(s / T), _np_log_softmax(t / T)
    return T * T * float((np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean())


def _hand_ce(s, y):
    ls = _np_log_softmax(s.detach().double().numpy())
    return float(-ls[np.arange(len(y)), y.numpy()].mean())


# ------------------------------------------------------------------ losses


def test_kd_losses_equal_hand_computation():
    student, teacher = _pair()
    d = build_distiller(DistillConfig(method="kd"), student, teacher, 5)
    batch = make_batch()
    out = d(batch, T=4.0, epoch=0)
    assert set(out.losses) == {"ce", "kd"}
    assert out.logits.shape == (8, 5) and out.teacher_logits.shape == (8, 5)
    kd = _hand_kd(out.logits, out.teacher_logits, 4.0)
    ce = _hand_ce(out.logits, batch["label"])
    assert out.losses["kd"].item() == pytest.approx(0.9 * kd, rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(0.1 * ce, rel=1e-5)
    assert kd > 0  # the check is not vacuous: the two nets disagree


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
def test_kd_is_t_squared_times_batchmean_kl(T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    assert kd_kl(s, t, T).item() == pytest.approx(_hand_kd(s, t, T), rel=1e-5)
    # batch mean, not sum: duplicating the batch leaves the value unchanged
    assert kd_kl(torch.cat([s, s]), torch.cat([t, t]), T).item() == pytest.approx(kd_kl(s, t, T).item(), rel=1e-6)


def test_kd_of_identical_logits_is_zero():
    z = torch.randn(4, 5)
    assert kd_kl(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_weights_are_applied_and_zero_weights_drop_terms():
    student, teacher = _pair()
    batch = make_batch()
    base = build_distiller(DistillConfig(method="kd", gamma=1.0, alpha=1.0), student, teacher, 5)(batch, 4.0, 0)
    d = build_distiller(DistillConfig(method="kd", gamma=0.3, alpha=0.5), student, teacher, 5)
    out = d(batch, 4.0, 0)
    assert out.losses["ce"].item() == pytest.approx(0.3 * base.losses["ce"].item(), rel=1e-6)
    assert out.losses["kd"].item() == pytest.approx(0.5 * base.losses["kd"].item(), rel=1e-6)
    only_kd = build_distiller(DistillConfig(method="kd", gamma=0.0, alpha=0.9), student, teacher, 5)(batch, 4.0, 0)
    assert set(only_kd.losses) == {"kd"}
    with pytest.raises(ConfigError, match="distill.gamma/alpha/beta"):
        build_distiller(DistillConfig(method="kd", gamma=0.0, alpha=0.0), student, teacher, 5)(batch, 4.0, 0)


def test_beta_default_and_override():
    assert default_beta("kd") == 0.0
    assert default_beta("logit_match") == 1.0
    student, teacher = _pair()
    batch = make_batch()
    d1 = build_distiller(DistillConfig(method="logit_match", gamma=0, alpha=0), student, teacher, 5)
    d2 = build_distiller(DistillConfig(method="logit_match", gamma=0, alpha=0, beta=2.5), student, teacher, 5)
    l1, l2 = d1(batch, 4.0, 0).losses, d2(batch, 4.0, 0).losses
    assert set(l1) == {"logit_match"}
    assert l2["logit_match"].item() == pytest.approx(2.5 * l1["logit_match"].item(), rel=1e-6)
    with pytest.raises(ConfigError, match="distill.beta"):
        build_distiller(DistillConfig(method="logit_match", beta=-1.0), student, teacher, 5)


def test_ce_needs_no_teacher_and_uses_weight_one():
    student, _ = _pair()
    batch = make_batch()
    out = build_distiller(DistillConfig(method="ce", gamma=0.1), student, None, 5)(batch, 4.0, 0)
    assert set(out.losses) == {"ce"} and out.teacher_logits is None
    assert out.losses["ce"].item() == pytest.approx(_hand_ce(out.logits, batch["label"]), rel=1e-5)


def test_kd_without_teacher_is_a_config_error():
    student, _ = _pair()
    with pytest.raises(ConfigError, match="distill.teacher"):
        build_distiller(DistillConfig(method="kd"), student, None, 5)


def test_unknown_method_names_the_key():
    student, teacher = _pair()
    cfg = DistillConfig()
    cfg.method = "nope"  # bypasses config validation on purpose
    with pytest.raises(ConfigError, match="distill.method.*known: .*kd"):
        build_distiller(cfg, student, teacher, 5)
    with pytest.raises(ConfigError, match="distill.method"):
        load_config(overrides=["distill.method=nope"])
    assert load_config(overrides=["distill.method=logit_match"]).distill.method == "logit_match"


# ------------------------------------------------------------------ teacher handling


def test_teacher_stays_eval_frozen_and_gets_no_grad():
    student, teacher = _pair()
    d = build_distiller(DistillConfig(method="kd"), student, teacher, 5)
    d.train()
    assert d.student.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    bn_before = teacher.stem[1].running_mean.clone()
    out = d(make_batch(), 4.0, 0)
    sum(out.losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert torch.equal(teacher.stem[1].running_mean, bn_before)  # eval mode: BN statistics untouched
    d.eval()
    d.train(True)
    assert not teacher.training


def test_teacher_is_outside_parameters_and_state_dict_but_moves_with_to():
    student, teacher = _pair()
    d = build_distiller(DistillConfig(method="kd"), student, teacher, 5)
    n_student = sum(1 for _ in student.parameters())
    assert sum(1 for _ in d.parameters()) == n_student
    assert all(k.startswith("student.") for k in d.state_dict())
    assert d.student_state_dict().keys() == student.state_dict().keys()
    d.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float64
    assert next(student.parameters()).dtype == torch.float64


def test_state_dict_round_trip():
    s1, t = _pair(0)
    s2, _ = _pair(1)
    d1 = build_distiller(DistillConfig(method="kd"), s1, t, 5)
    d2 = build_distiller(DistillConfig(method="kd"), s2, t, 5)
    d2.load_state_dict(d1.state_dict())
    d1.eval(), d2.eval()
    batch = make_batch()
    assert torch.equal(d1(batch, 4.0, 0).logits, d2(batch, 4.0, 0).logits)


class _CountingNet(TinyNet):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.feature_calls = 0

    def forward(self, x, is_feat=False, preact=False):
        self.feature_calls += int(is_feat)
        return super().forward(x, is_feat, preact)


def test_kd_does_not_ask_for_features_but_feature_methods_do():
    torch.manual_seed(0)
    s, t = _CountingNet(5, 4), _CountingNet(5, 6)
    build_distiller(DistillConfig(method="kd"), s, t, 5)(make_batch(), 4.0, 0)
    assert s.feature_calls == 0 and t.feature_calls == 0
    d = build_distiller(DistillConfig(method="at"), s, t, 5, image_size=8)  # probes shapes once
    d(make_batch(), 4.0, 0)
    assert s.feature_calls == 2 and t.feature_calls == 2


def test_registered_names():
    assert {"ce", "kd", "logit_match", "dkd"} <= set(DISTILLERS.names())


# ------------------------------------------------------------------ temperature schedules


def _sched(epochs=11, **kw):
    return build_temperature(TemperatureConfig(**kw), epochs)


def test_constant_schedule():
    f = _sched(schedule="constant", T=3.0, T_end=9.0)
    assert [f(e) for e in (0, 5, 10, 50)] == [3.0] * 4


@pytest.mark.parametrize("name", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("T,T_end", [(1.0, 16.0), (8.0, 2.0)])
def test_interpolating_schedules_endpoints_and_monotone(name, T, T_end):
    f = _sched(11, schedule=name, T=T, T_end=T_end)
    values = [f(e) for e in range(11)]
    assert values[0] == pytest.approx(T) and values[-1] == pytest.approx(T_end)
    diffs = np.diff(values) * np.sign(T_end - T)
    assert (diffs > 0).all()  # strictly monotone towards T_end
    assert f(100) == pytest.approx(T_end)  # clamps after the last epoch
    assert [f(e) for e in range(11)] == values  # deterministic


def test_interpolating_schedules_midpoints():
    assert _sched(11, schedule="linear", T=2.0, T_end=10.0)(5) == pytest.approx(6.0)
    assert _sched(11, schedule="cosine", T=2.0, T_end=10.0)(5) == pytest.approx(6.0)
    assert _sched(11, schedule="cosine", T=2.0, T_end=10.0)(1) < _sched(11, schedule="linear", T=2.0, T_end=10.0)(1)
    assert _sched(11, schedule="exponential", T=1.0, T_end=16.0)(5) == pytest.approx(4.0)  # geometric mean
    assert _sched(1, schedule="linear", T=2.0, T_end=10.0)(0) == pytest.approx(2.0)


def test_step_schedule_values():
    f = _sched(schedule="step", T=4.0, milestones=[3, 6], values=[8.0, 1.5])
    assert [f(e) for e in range(9)] == [4.0, 4.0, 4.0, 8.0, 8.0, 8.0, 1.5, 1.5, 1.5]


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(milestones=[3, 6], values=[8.0]), "distill.temperature.values"),
        (dict(milestones=[], values=[]), "distill.temperature.milestones"),
        (dict(milestones=[6, 3], values=[1.0, 2.0]), "distill.temperature.milestones"),
        (dict(milestones=[3], values=[0.0]), "distill.temperature.values"),
    ],
)
def test_step_schedule_errors_name_the_field(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _sched(schedule="step", **kw)


def test_schedule_config_errors():
    cfg = TemperatureConfig()
    cfg.schedule = "zigzag"
    with pytest.raises(ConfigError, match="distill.temperature.schedule.*known: .*cosine"):
        build_temperature(cfg, 10)
    with pytest.raises(ConfigError, match="distill.temperature.schedule"):
        load_config(overrides=["distill.temperature.schedule=zigzag"])
    c = load_config(overrides=["distill.temperature.schedule=step", "distill.temperature.milestones=[2]",
                               "distill.temperature.values=[1.0]"])
    assert build_temperature(c.distill.temperature, 5)(2) == 1.0
    assert math.isclose(build_temperature(c.distill.temperature, 5)(1), 4.0)
