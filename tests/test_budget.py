"""selection.budget: a target compute ratio each strategy turns into its own parameter before training.

Pure resolution against the plan's expected ratio, then real in-process runs whose compute ledger must land on the
budget (kcd and random are deterministic: within 0.02), and the one-line errors of budgets no value reaches.
"""

from __future__ import annotations

import numpy as np
import pytest

from kcd_ray.config import ConfigError, load_config
from kcd_ray.engine.context import LocalServices
from kcd_ray.engine.plan.budget import with_value
from kcd_ray.engine.plan.derive import DataPlan, apply_budget, plan_compute, plan_selection

from engine_harness import config, feeds, make_engine, tiny_set

FLOPS = (1.0e6, 2.0e6, 6.0e6)  # student forward, backward, teacher forward per sample (a teacher 6x the student)


def data_of(num_train: int) -> DataPlan:
    return DataPlan(dir="", uri="", name="synthetic", num_train=num_train, num_test=10, num_val=0, num_classes=4,
                    image_shape=(8, 8, 3), augment="none")


def cfg_of(**over):
    base = {"model": "resnet8", "optim": {"epochs": 18}, "kcd": {"interval": 3, "stages": 6}}
    return load_config(base=base, overrides=[f"{k}={v}" for k, v in over.items()])


def planned(cfg, num_train: int, paid: bool = False) -> float:
    return plan_compute(plan_selection(cfg, "distill", num_train), FLOPS, paid).planned_compute_ratio


def test_with_value_replaces_nested_and_strategy_sections():
    cfg = cfg_of(**{"selection.strategy": "infobatch"})
    out = with_value(with_value(cfg, "kcd.rho", 0.4), "selection.infobatch.ratio", 0.3)
    assert (out.kcd.rho, out.selection.infobatch.ratio) == (0.4, 0.3)
    assert (cfg.kcd.rho, cfg.selection.infobatch.ratio) == (0.7, 0.5)  # never mutated


@pytest.mark.parametrize("num_train", [2000, 1150])  # the default synthetic set and digits' training split
@pytest.mark.parametrize("strategy,key,estep,low", [  # low: inside the reachable range (18 epochs, 6 stages of 3)
    ("kcd", "kcd.rho", "online", 0.65), ("kcd", "kcd.rho", "offline", 0.85),
    ("random", "selection.random.fraction", "online", 0.1), ("infobatch", "selection.infobatch.ratio", "online", 0.65),
    ("unixkd", "selection.unixkd.ratio", "online", 0.5)])
def test_the_resolved_parameter_plans_the_budget(strategy, key, estep, low, num_train):
    for budget in np.linspace(low, 0.95, 5):
        cfg = cfg_of(**{"selection.strategy": strategy, "selection.budget": round(float(budget), 3),
                        "kcd.estep": estep, "kcd.value_fn": "kd"})
        out, resolved = apply_budget(cfg, "distill", data_of(num_train), FLOPS)
        assert list(resolved) == [key]
        assert abs(planned(out, num_train) - budget) <= 0.02, (strategy, budget, resolved)


def test_plain_kd_meets_a_budget_of_one_and_an_end_of_a_range_takes_that_end():
    out, resolved = apply_budget(cfg_of(**{"selection.strategy": "none", "selection.budget": 1.0}), "distill",
                                 data_of(1150), FLOPS)
    assert resolved == {} and out.selection.budget == 1.0
    _, resolved = apply_budget(cfg_of(**{"selection.strategy": "kcd", "selection.budget": 1.0}), "distill",
                               data_of(1150), FLOPS)
    assert resolved == {"kcd.rho": 1.0}


def test_kcd_can_keep_rho_and_set_its_stages_instead():
    cfg = cfg_of(**{"selection.strategy": "kcd", "selection.budget": 0.8, "selection.budget_key": "kcd.stages",
                    "kcd.rho": 0.5})
    out, resolved = apply_budget(cfg, "distill", data_of(1150), FLOPS)
    assert set(resolved) == {"kcd.stages"} and out.kcd.rho == 0.5
    ratios = {s: planned(with_value(cfg, "kcd.stages", s), 1150) for s in range(1, 7)}
    assert resolved["kcd.stages"] == min(ratios, key=lambda s: abs(ratios[s] - 0.8))


def test_teacher_paid_counts_the_student_alone():
    """With the teacher's forwards paid by a shared cache, a budget of the student's compute asks for less pruning
    than one of student+teacher when the offline E-step pays student forwards over every sample."""
    cfg = cfg_of(**{"selection.strategy": "kcd", "kcd.rho": 0.5, "kcd.estep": "offline", "kcd.value_fn": "kd"})
    assert planned(cfg, 1150, paid=True) != pytest.approx(planned(cfg, 1150, paid=False), abs=1e-3)
    bad = cfg_of(**{"selection.strategy": "kcd", "selection.budget": 0.6, "selection.teacher_paid": True})
    with pytest.raises(ConfigError, match=r"selection.teacher_paid: .*distill.cache=exact"):
        apply_budget(bad, "distill", data_of(1150), FLOPS)


@pytest.mark.parametrize("over,match", [
    ({"selection.strategy": "kcd", "selection.budget": 0.1},
     r"^selection.budget: 0.1 is below the smallest compute ratio kcd reaches by kcd.rho \(0\.\d+.*raise "
     r"selection.budget to at least 0\.\d+, or change kcd.interval"),
    ({"selection.strategy": "unixkd", "selection.budget": 0.1},
     r"^selection.budget: 0.1 is below the smallest .* unixkd .*selection.unixkd.ratio"),
    ({"selection.strategy": "none", "selection.budget": 0.5}, r"^selection.budget: 0.5 is not what "
     r"selection.strategy 'none' runs at \(1.000\) and it has no parameter"),
    ({"selection.strategy": "kcd", "selection.budget": 0.5, "selection.budget_key": "kcd.warmup"},
     r"^selection.budget_key: 'kcd.warmup' is not a key .*kcd.rho, kcd.stages"),
    ({"selection.strategy": "kcd", "selection.budget": 0.5, "curriculum.name": "ed"}, r"^selection.budget: with "
     r"curriculum.name=ed"),
])
def test_a_budget_no_value_reaches_is_one_line_naming_the_key(over, match):
    with pytest.raises(ConfigError, match=match) as err:
        apply_budget(cfg_of(**over), "distill", data_of(1150), FLOPS)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget_digits")
    return tiny_set(root, num_classes=10, data={"name": "digits", "image_size": 8, "val_fraction": 0.2},
                    optim={"epochs": 6, "batch_size": 64})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return tiny_set(tmp_path_factory.mktemp("budget_synthetic"), num_train=192, optim={"epochs": 6})


@pytest.mark.parametrize("data", ["synthetic", "digits"])
@pytest.mark.parametrize("strategy,budget,estep", [("kcd", 0.6, "online"), ("kcd", 0.75, "offline"),
                                                   ("random", 0.45, "online")])
def test_a_run_lands_on_its_budget(request, data, strategy, budget, estep, tmp_path):
    """The ledger's compute ratio of a real run (FLOPs of every pass it made) is the budget, within 0.02."""
    tiny = request.getfixturevalue(data)
    cfg = config(tiny, **{"selection.strategy": strategy, "selection.budget": budget, "kcd.interval": 1,
                          "kcd.stages": 3, "kcd.estep": estep, "kcd.value_fn": "kd"})
    ids = tiny["split"]["train"][0].numpy()
    services = LocalServices(checkpoint_dir=tmp_path / "run" / "local_checkpoint",  # the offline E-step's values
                             scorer=lambda state, epoch: (ids, ((ids * 7919) % 101).astype(np.float32)))
    engine = make_engine(tiny, tmp_path / "run", cfg, services=services)
    summary = engine.run(*feeds(tiny, engine))
    assert summary["budget"] == budget and summary["budget_resolved"]
    assert abs(summary["compute_ratio"] - budget) <= 0.02, summary
    assert abs(summary["planned_compute_ratio"] - summary["compute_ratio"]) <= 0.01
    assert summary["config"]["selection"]["budget"] == budget  # the resolved value is in the recorded config
    key, value = next(iter(summary["budget_resolved"].items()))
    section, _, field = key.rpartition(".")
    recorded = summary["config"]
    for part in section.split("."):
        recorded = recorded[part]
    assert recorded[field] == value


def test_a_pbt_sweep_with_a_budget_is_refused_in_one_line():
    from kcd_ray.sweeps.spec import load_sweep

    base = {"model": "resnet8", "data": {"name": "digits", "image_size": 8, "val_fraction": 0.2},
            "optim": {"epochs": 6}, "distill": {"teacher": "t.pt"}, "selection": {"strategy": "kcd"},
            "scaling": {"num_workers": 0}}
    for space, b in (({"selection.budget": [0.5, 0.7]}, base),
                     ({"kcd.interval": [1, 2]}, {**base, "selection": {"strategy": "kcd", "budget": 0.7}})):
        with pytest.raises(ConfigError, match=r"pbt and selection.budget: .*grid, random or optuna") as err:
            load_sweep({"base": b, "space": space, "search": "random", "num_samples": 2, "pbt": {"interval": 2}})
        assert "\n" not in str(err.value)
