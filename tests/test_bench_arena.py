"""bench/arena.py's pure parts: the points and their order, which budgets each strategy reaches on a plan made by
hand, the shards, and the aggregation and headline on hand-made run results. No Ray, no data set."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from arena import parse_sets  # noqa: E402
from arena_points import (BUDGETED, base_config, ordered_points, run_config, select_points,  # noqa: E402
                          shard_runs, unreachable)
from arena_report import budget_markdown, headline, headline_lines, plot_rows, point_table, ranking  # noqa: E402

from kcd_ray.config import load_config  # noqa: E402
from kcd_ray.engine.plan.derive import DataPlan  # noqa: E402

FLOPS = (25e6, 49e6, 82e6)  # resnet8 forward, backward, resnet20 forward per 32x32 sample (about the ledger's)


def fashion_plan(num_train: int = 15000) -> DataPlan:
    return DataPlan(dir="", uri="", name="fashion_mnist", num_train=num_train, num_test=10000, num_val=2500,
                    num_classes=10, image_shape=(32, 32, 3), augment="cifar")


def test_points_run_the_baselines_then_kcd_at_the_target_budgets_first():
    pts = ordered_points()
    names = [p.name for p in pts]
    assert names[:5] == ["kd", "kd-ls", "kcd-0.5", "kcd-0.4", "random-0.5"]
    assert len(names) == len(set(names)) == 4 + len(BUDGETED) * 4
    for fam in BUDGETED:  # every budgeted family at every budget, its budget in its config
        assert sorted(p.budget for p in pts if p.family == fam) == [0.4, 0.5, 0.6, 0.75]
    assert all(p.sections["selection"].get("budget") == p.budget for p in pts if p.budget is not None)
    assert names.index("ctkd") < names.index("kcd-0.6")
    assert [p.name for p in select_points(pts, ["random-0.4", "kcd-0.5"])] == ["kd", "kcd-0.5", "random-0.4"]
    with pytest.raises(ValueError, match="unknown"):
        select_points(pts, ["kcd-0.45"])


def test_point_configs_are_what_the_protocol_says():
    base = base_config("fashion", "/tmp/arena", 15, "/tmp/t.pt")
    by = {p.name: p for p in ordered_points()}
    ls = load_config(base=run_config(base, by["kcd-ls-0.4"], 2))
    assert (ls.distill.logit_standardize, ls.distill.alpha, ls.distill.temperature.T) == (True, 9.0, 2.0)
    assert (ls.selection.strategy, ls.selection.budget, ls.kcd.interval, ls.kcd.stages) == ("kcd", 0.4, 1, 3)
    assert (ls.optim.seed, ls.run.name, ls.distill.cache, ls.model) == (2, "kcd-ls-0.4-s2", "exact", "resnet8")
    kd = load_config(base=run_config(base, by["kd"], 0))
    assert (kd.distill.gamma, kd.distill.alpha, kd.distill.temperature.T, kd.distill.logit_standardize) == \
        (0.1, 0.9, 4.0, False)
    assert (kd.data.train_subset, kd.data.image_size, kd.data.channels) == (17500, 32, 3)
    assert round(kd.data.val_fraction * 17500) == 2500
    assert load_config(base=run_config(base, by["dkd"], 0)).distill.method == "dkd"
    assert load_config(base=run_config(base, by["ctkd"], 0)).distill.temperature.schedule == "ctkd"


def test_unreachable_budgets_are_named_with_the_runs_reason():
    base = base_config("fashion", "/tmp/arena", 15, "/tmp/t.pt")
    why = unreachable(ordered_points(), base, fashion_plan(), FLOPS)
    # InfoBatch prunes at most about half its well-learned samples over 13 of 15 epochs: 0.4 and 0.5 are out of reach.
    assert sorted(why) == ["infobatch-0.4", "infobatch-0.5"]
    assert all(w.startswith("selection.budget:") for w in why.values())
    # KCD condensing every 40 epochs (the paper's interval) never condenses in 15: none of its budgets is reachable.
    slow = unreachable(ordered_points(kcd={"interval": 40, "stages": 6}), base, fashion_plan(), FLOPS)
    assert {"kcd-0.4", "kcd-0.5", "kcd-ls-0.6"} <= set(slow)


def test_shards_split_the_runs_without_overlap():
    runs = [(p.name, s) for p in ordered_points() for s in (0, 1, 2)]
    a, b = shard_runs(runs, 1, 2), shard_runs(runs, 2, 2)
    assert not set(a) & set(b) and sorted(a + b) == sorted(runs) and abs(len(a) - len(b)) <= 1
    assert a[0] == ("kd", 0) and b[0] == ("kd", 1)


def test_parse_sets_nests_dotted_keys():
    assert parse_sets(["data.train_subset=2000", "optim.lr=0.1", "data.channels=3"]) == \
        {"data": {"train_subset": 2000, "channels": 3}, "optim": {"lr": 0.1}}


def _run(test, val=80.0, best=None, compute=1.0):
    return {"final_top1": test, "final_val_top1": val, "best_top1": best or test, "compute_ratio": compute,
            "planned_compute_ratio": compute, "wall_s": 10.0}


def _results():
    return {
        "kd": {0: _run(90.0), 1: _run(91.0), 2: _run(92.0)},  # mean 91.0
        "kd-ls": {0: _run(92.0), 1: _run(92.0), 2: _run(92.0)},
        "kcd-0.4": {0: _run(90.5, compute=0.41), 1: _run(91.0, compute=0.41), 2: _run(91.4, compute=0.41)},  # 90.97
        "kcd-0.5": {0: _run(91.0, compute=0.5), 1: _run(91.0, compute=0.5), 2: _run(91.0, compute=0.5)},  # = KD
        "kcd-0.6": {0: _run(93.0, compute=0.6), 1: _run(93.0, compute=0.6), 2: _run(93.0, compute=0.6)},
        "random-0.4": {0: _run(95.0, compute=0.4), 1: _run(95.0, compute=0.4)},  # 2 of 3 seeds: not counted
        "random-0.5": {0: _run(90.0, compute=0.5), 1: _run(89.0, compute=0.5), 2: _run(90.0, compute=0.5)},
        "unixkd-0.5": {0: _run(92.5, compute=0.52), 1: _run(92.5, compute=0.52), 2: _run(92.5, compute=0.52)},
    }


def _rows():
    pts = select_points(ordered_points(), ["kd", "kd-ls", "kcd-0.4", "kcd-0.5", "kcd-0.6", "random-0.4",
                                           "random-0.5", "unixkd-0.5", "infobatch-0.4", "ctkd"])
    return point_table(pts, _results(), {"infobatch-0.4": "selection.budget: 0.4 is below ..."}, [0, 1, 2])


def test_aggregates_are_mean_and_standard_error_over_seeds():
    rows = {r["point"]: r for r in _rows()}
    kd = rows["kd"]
    assert kd["test"] == pytest.approx(91.0) and kd["test_se"] == pytest.approx(1 / math.sqrt(3))
    assert kd["status"] == "done" and kd["seeds_done"] == 3
    assert rows["random-0.4"]["status"] == "2/3 seeds" and rows["random-0.4"]["test"] == pytest.approx(95.0)
    assert rows["infobatch-0.4"]["status"] == "unreachable" and rows["ctkd"]["status"] == "not yet run"
    assert rows["kcd-0.4"]["compute_ratio"] == pytest.approx(0.41)


def test_headline_is_the_smallest_budget_at_or_above_the_baselines_mean():
    rows = _rows()
    h = headline(rows, "kd")
    assert h["kcd"]["budget"] == 0.5  # 0.4 is 0.03 below KD's mean; 0.5 equals it
    assert h["random"] is None  # 0.4 lacks a seed, 0.5 is below
    assert h["unixkd"]["budget"] == 0.5 and h["infobatch"] is None
    h_ls = headline(rows, "kd-ls")
    assert h_ls["kcd"]["budget"] == 0.6 and h_ls["unixkd"]["budget"] == 0.5
    assert headline([r for r in rows if r["point"] != "kd"], "kd") is None
    assert [r["family"] for r in ranking(rows)[0.5]] == ["unixkd", "kcd", "random"]
    lines = headline_lines(rows)
    assert "KCD target (budget <= 0.5 against KD): met at 0.5" in lines
    assert any(line.startswith("KCD target") and "NOT met" in line for line in headline_lines(rows, target=0.4))
    no_kcd = [r for r in rows if r["family"] != "kcd"]
    assert any(line.startswith("KCD target") and "not known yet" in line for line in headline_lines(no_kcd))


def test_budget_table_and_plot_rows():
    rows = _rows()
    table = "\n".join(budget_markdown(rows, [0.4, 0.5]))
    assert "unreachable" in table and "[2/3 seeds]" in table and "| 0.5 |" in table
    prow = {(r["info"]["tag"], r["compute_ratio"]): r for r in plot_rows(rows)}
    assert ("ctkd", None) not in prow  # nothing run yet: not drawn
    assert prow[("random", 0.4)]["pareto"] and not prow[("kcd", 0.41)]["pareto"]  # random 0.4 dominates it
