"""`kcd-ray report` over several sweep folders: one Pareto plot, points averaged over seeds (no Ray needed).

The sweep folders are written as `kcd-ray sweep` writes them: ``<sweep>/sweep.yaml`` from the shipped sweep file,
``<sweep>/runs/<name>_<trial_id>/`` with ``config.yaml`` (the trial's config from ``trial_config``),
``metrics.jsonl`` and ``summary.json`` (from the engine's own ``summarize``, compute ledger fields included).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from kcd_ray.cli import main
from kcd_ray.config import dump_yaml, to_dict
from kcd_ray.engine.metrics import summarize
from kcd_ray.report import report
from kcd_ray.sweeps.spec import load_sweep
from kcd_ray.ray_layer.tune.sweep import trial_config

SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"
NUM_TRAIN, EPOCHS = 100, 3
FLOPS = {"flops_student_forward": 1.0, "flops_student_backward": 2.0, "flops_teacher_forward": 3.0}  # 6 per sample


def _trial(sw, values: dict, variant: str, trial_id: str, top1: float, ratio: float, done: bool = True) -> Path:
    """One trial's run folder; its final top-1 is ``top1`` and its FLOPs-based compute_ratio ``ratio``."""
    payload = {"name": sw.name, "kind": "distill", "base": sw.base, "runs_dir": str(sw.runs_dir)}
    cfg = trial_config({**values, "variant": variant}, payload, trial_id)
    folder = sw.runs_dir / cfg.run.name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    strategy = {"kd": "none"}.get(variant, variant)
    history, passes = [], 0
    per_kd = sum(FLOPS.values())
    for e in range(EPOCHS):
        kept = 1.0 if variant == "kd" else ratio
        passes += int(NUM_TRAIN * kept)
        history.append({"epoch": e, "top1": top1 - 10 * (EPOCHS - 1 - e), "top5": 99.0, "kept_fraction": kept,
                        "T": 4.0, "train_loss": 1.0 / (e + 1), "lr": 0.05, "sample_passes": passes,
                        "flops_total": ratio * per_kd * NUM_TRAIN * (e + 1), **FLOPS, "strategy": strategy,
                        "wall_seconds": 2.0 * (e + 1), "kcd_enabled": variant == "kcd",
                        "compute_ratio": ratio})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if done:
        summary = summarize(history, kind="distill", num_train=NUM_TRAIN,
                            epochs=EPOCHS, run_dir=str(folder), config=to_dict(cfg))
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    else:  # ASHA stopped it: metrics only
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history[:1]))
    return folder


def _sweep(tmp: Path, file: str):
    sw = load_sweep(SWEEPS / file, storage_path=str(tmp / "sweeps"))
    sw.folder.mkdir(parents=True)
    (sw.folder / "sweep.yaml").write_text(sw.to_yaml())
    return sw


# (strategy, setting) -> (compute ratio, {seed: final top-1})
KCD = {0.5: (0.6, {0: 77.0, 1: 79.0}), 0.7: (0.8, {0: 79.0, 1: 80.0})}
INFOBATCH = {0.3: (0.85, {0: 78.0, 1: 79.0, 2: 80.0}),   # dominated by kcd rho 0.7 (0.8, 79.5)
             0.7: (0.5, {0: 74.0, 1: 75.0, 2: 76.0})}    # the cheapest: on the front
RANDOM = {0.5: (0.55, {0: 70.0, 1: 72.0, 2: 74.0}),      # dominated by infobatch 0.7
          0.9: (0.92, {0: 78.0, 1: 78.5, 2: 79.0})}      # dominated by kcd rho 0.7
KD_TOP1 = {"rho": 79.5, "infobatch": 80.0, "random_subset": 80.5}  # each sweep's plain-KD baseline, all seed 0


@pytest.fixture()
def sweeps(tmp_path):
    folders = {}
    for file, key, table, variant in (("rho.yaml", "kcd.rho", KCD, "kcd"),
                                      ("infobatch.yaml", "selection.infobatch.ratio", INFOBATCH, "infobatch"),
                                      ("random_subset.yaml", "selection.random.fraction", RANDOM, "random")):
        sw = _sweep(tmp_path, file)
        i = 0
        for setting, (ratio, seeds) in table.items():
            for seed, top1 in seeds.items():
                values = {key: setting, "optim.seed": seed}
                if variant == "infobatch":
                    values["selection.infobatch.delta"] = 0.875
                _trial(sw, values, variant, f"{i:05d}", top1, ratio)
                i += 1
        _trial(sw, {key: next(iter(table)), "optim.seed": 0}, "kd", f"{i:05d}", KD_TOP1[sw.name], 1.0)
        # An early-stopped trial: no summary.json, kept out of the points.
        _trial(sw, {key: next(iter(table)), "optim.seed": 7}, variant, f"{i + 1:05d}", 10.0, 0.1, done=False)
        folders[sw.name] = sw.folder
    return folders


def _point(points, strategy, setting):
    found = [p for p in points if p["strategy"] == strategy and p["setting"] == setting]
    assert len(found) == 1, (strategy, setting, [(p["strategy"], p["setting"]) for p in points])
    return found[0]


def test_points_are_averaged_over_seeds(sweeps, tmp_path):
    res = report([sweeps["rho"], sweeps["infobatch"], sweeps["random_subset"]], out_dir=tmp_path / "out")
    assert res["kind"] == "compare"
    pts = res["points"]
    assert len(pts) == 7  # 2 kcd + 2 infobatch + 2 random + one plain KD shared by the three sweeps
    assert res["skipped"]["unfinished"] == 3

    p = _point(pts, "kcd", "kcd.rho=0.5")
    assert p["n_seeds"] == 2 and p["seeds"] == [0, 1] and p["n_runs"] == 2
    assert math.isclose(p["final_top1_mean"], 78.0) and math.isclose(p["final_top1_se"], 1.0)
    assert math.isclose(p["compute_ratio"], 0.6)
    assert math.isclose(p["sample_pass_ratio"], 0.6)  # int(100 * 0.6) passes per epoch of 100
    assert math.isclose(p["best_top1_mean"], 78.0)

    p = _point(pts, "infobatch", "selection.infobatch.ratio=0.3")
    assert p["n_seeds"] == 3 and math.isclose(p["final_top1_mean"], 79.0)
    assert math.isclose(p["final_top1_se"], 1 / math.sqrt(3))
    p = _point(pts, "random", "selection.random.fraction=0.5")
    assert math.isclose(p["final_top1_mean"], 72.0) and math.isclose(p["final_top1_se"], 2 / math.sqrt(3))
    assert math.isclose(p["compute_ratio"], 0.55)

    # The three sweeps' plain-KD baselines differ only in the other strategies' settings and bookkeeping: one
    # point, one seed (0) run three times, so no standard error.
    kd = _point(pts, "kd", "-")
    assert kd["n_runs"] == 3 and kd["n_seeds"] == 1 and kd["seeds"] == [0] and kd["final_top1_se"] is None
    assert math.isclose(kd["final_top1_mean"], 80.0) and kd["compute_ratio"] == 1.0
    assert len(kd["folders"]) == 3

    front = {(p["strategy"], p["setting"]) for p in pts if p["pareto"]}
    assert front == {("infobatch", "selection.infobatch.ratio=0.7"), ("kcd", "kcd.rho=0.5"),
                     ("kcd", "kcd.rho=0.7"), ("kd", "-")}
    assert [p["strategy"] for p in res["pareto"]] == ["infobatch", "kcd", "kcd", "kd"]  # cheapest first
    assert [p["strategy"] for p in pts] == ["kd", "kcd", "kcd", "infobatch", "infobatch", "random", "random"]


def test_csv_png_and_text(sweeps, tmp_path):
    out = tmp_path / "out"
    res = report([sweeps["rho"], sweeps["infobatch"], sweeps["random_subset"]], out_dir=out)
    with open(out / "compare_points.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    by = {(r["strategy"], r["setting"]): r for r in rows}
    r = by[("kcd", "kcd.rho=0.7")]
    assert math.isclose(float(r["final_top1_mean"]), 79.5) and math.isclose(float(r["final_top1_se"]), 0.5)
    assert math.isclose(float(r["compute_ratio"]), 0.8) and r["n_seeds"] == "2" and r["pareto"] == "True"
    assert json.loads(r["seeds"]) == [0, 1]
    assert by[("random", "selection.random.fraction=0.9")]["pareto"] == "False"
    assert by[("kd", "-")]["final_top1_se"] == ""
    assert (out / "compare_pareto.png").read_bytes()[:4] == b"\x89PNG" and res["png"] == str(out / "compare_pareto.png")
    text = res["text"]
    assert "79.5 +- 0.5" in text and "78 +- 1" in text
    assert "selection.infobatch.ratio=0.7 (0.5, 75)" in text  # first on the Pareto line, cheapest first
    assert "skipped: 3 unfinished" in text


def test_default_out_dir_is_the_common_parent(sweeps):
    res = report([sweeps["rho"], sweeps["infobatch"]])
    parent = sweeps["rho"].parent
    assert res["csv"] == str(parent.resolve() / "compare_points.csv")
    assert (parent / "compare_pareto.png").is_file()
    assert {p["strategy"] for p in res["points"]} == {"kd", "kcd", "infobatch"}
    kd = _point(res["points"], "kd", "-")
    assert kd["n_runs"] == 2 and math.isclose(kd["final_top1_mean"], 79.75)


def test_one_folder_keeps_the_sweep_report_and_compare_aggregates_it(sweeps, tmp_path):
    one = report(sweeps["infobatch"])
    assert one["kind"] == "sweep" and len(one["rows"]) == 8  # 6 trials, the KD baseline, the stopped one
    assert (sweeps["infobatch"] / "pareto.png").is_file() and (sweeps["infobatch"] / "trials.csv").is_file()
    agg = report(sweeps["infobatch"], out_dir=tmp_path / "agg", compare=True)
    assert agg["kind"] == "compare"
    assert sorted((p["strategy"], p["n_seeds"]) for p in agg["points"]) == [("infobatch", 3), ("infobatch", 3),
                                                                             ("kd", 1)]


def test_cli_several_folders_and_a_bad_one(sweeps, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["report", str(sweeps["rho"]), str(sweeps["infobatch"]), str(sweeps["random_subset"]),
               "--out-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "7 points" in printed and (out / "compare_points.csv").is_file()

    bad = tmp_path / "not_a_sweep"
    (bad / "stuff").mkdir(parents=True)
    (bad / "notes.txt").write_text("hello")
    rc = main(["report", str(sweeps["rho"]), str(bad), "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(bad) in err and "not a sweep or run folder" in err

    missing = tmp_path / "nope"
    rc = main(["report", str(sweeps["rho"]), str(missing)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(missing) in err
