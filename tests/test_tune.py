"""Sweeps (kcd_ray.ray_layer.tune): sweep-file validation, resources, the report, and one real 2-trial Tune sweep."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest
import yaml

from kcd_ray.config import ConfigError, load_config, to_dict
from kcd_ray.report import format_table, pareto_flags, report
from kcd_ray.sweeps.space import apply_values, parse_space
from kcd_ray.engine.engine import ENGINE_COLUMNS
from kcd_ray.sweeps.metrics import SUMMARY_KEYS, epoch_metrics, is_epoch_metric, is_reported_metric
from kcd_ray.sweeps.spec import load_sweep, split_overrides
from kcd_ray.ray_layer.tune.resources import derive_concurrency, share_of, trial_resources
from kcd_ray.ray_layer.tune.sweep import trial_config

BASE = {"data": {"name": "digits", "image_size": 16, "val_fraction": 0.2}, "optim": {"epochs": 2}}


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- sweep files


def test_unknown_space_key_names_key_and_file(tmp_path):
    f = _write(tmp_path / "bad.yaml", {"base": BASE, "space": {"kcd.rhoo": [0.5, 0.7]}})
    with pytest.raises(ConfigError) as e:
        load_sweep(f)
    assert str(f) in str(e.value) and "kcd.rhoo" in str(e.value) and "rho" in str(e.value)
    f2 = _write(tmp_path / "bad2.yaml", {"base": BASE, "space": {"optimm.lr": [0.1]}})
    with pytest.raises(ConfigError, match=r"bad2\.yaml.*optimm\.lr"):
        load_sweep(f2)


def test_space_values_are_checked_against_the_config(tmp_path):
    cases = [({"kcd.rho": [0.5, 1.5]}, "1.5"),
             ({"kcd.value_fn": ["entropy", "nope"]}, "nope"),
             ({"kcd.rho": {"uniform": [0.2, 1.2]}}, "1.2"),
             ({"optim.lr": {"loguniform": [0.0, 0.1]}}, "low > 0"),
             ({"kcd.stages": {"randint": [3, 3]}}, "low < high"),
             ({"kcd.rho": {"normal": [0, 1]}}, "grid|choice"),
             ({"distill.temperature": [4.0]}, "section")]
    for i, (space, needle) in enumerate(cases):
        f = _write(tmp_path / f"s{i}.yaml", {"base": BASE, "space": space})
        with pytest.raises(ConfigError) as e:
            load_sweep(f)
        assert needle in str(e.value) and f"s{i}.yaml" in str(e.value), (space, str(e.value))


def test_unknown_sweep_key_and_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="serach: unknown sweep key"):
        load_sweep(_write(tmp_path / "a.yaml", {"base": BASE, "serach": "grid"}))
    with pytest.raises(ConfigError, match="search: 'bayes'"):
        load_sweep(_write(tmp_path / "b.yaml", {"base": BASE, "search": "bayes"}))
    with pytest.raises(ConfigError, match="include_kd_baseline"):
        load_sweep({"base": {**BASE, "kcd": {"enabled": False}}, "include_kd_baseline": True})
    # In-process trials report every epoch too, so ASHA works with them.
    assert load_sweep({"base": {**BASE, "scaling": {"num_workers": 0}}, "asha": True}).asha["metric"] == "val_top1"
    with pytest.raises(ConfigError, match=r"asha\.metric: 'final_top1' is not a metric the runs report every epoch"):
        load_sweep({"base": BASE, "asha": {"metric": "final_top1"}})  # only known at the end: nothing to stop on
    with pytest.raises(ConfigError, match="mode: 'maximize'"):
        load_sweep({"base": BASE, "mode": "maximize"})
    with pytest.raises(ConfigError, match="asha.mode: 'up' is not one of: max, min"):
        load_sweep({"base": BASE, "asha": {"mode": "up"}})
    with pytest.raises(ConfigError, match="base: recipe .*missing.yaml does not exist"):
        load_sweep(_write(tmp_path / "c.yaml", {"base": "missing.yaml"}))


def test_a_scheduler_stops_in_the_direction_its_metric_improves():
    """ASHA and PBT rank trials the way their own metric improves: a loss is minimised, an accuracy maximised,
    whatever the sweep's mode; the sweep's own metric keeps the sweep's mode."""
    base = {**BASE, "scaling": {"num_workers": 0}}
    assert load_sweep({"base": base, "asha": {"metric": "val_loss"}}).asha["mode"] == "min"
    assert load_sweep({"base": base, "metric": "val_loss", "mode": "min", "asha": True}).asha == \
        {"metric": "val_loss", "mode": "min", "grace_period": 1, "reduction_factor": 2, "max_t": 2}
    assert load_sweep({"base": base, "metric": "val_loss", "mode": "min", "asha": {"metric": "val_top1"}}
                      ).asha["mode"] == "max"
    # a sweep on a figure known only at the end (planned compute, minimised) stops trials on validation top-1,
    # maximised
    assert load_sweep({"base": base, "metric": "planned_compute_ratio", "mode": "min", "asha": True}
                      ).asha == {"metric": "val_top1", "mode": "max", "grace_period": 1, "reduction_factor": 2,
                                 "max_t": 2}
    pbt_base = {**base, "optim": {"epochs": 4}, "kcd": {"summary": False}}
    assert load_sweep({"base": pbt_base, "metric": "val_loss", "mode": "min",
                       "space": {"optim.lr": [0.1, 0.2]}, "pbt": True}).pbt["mode"] == "min"


def _no_ray(monkeypatch):
    """Fail the test if the sweep gets as far as starting Ray or Tune."""
    import ray
    from ray import tune

    def boom(*a, **k):
        raise AssertionError("Ray/Tune started: the sweep should have been refused before")

    monkeypatch.setattr(ray, "init", boom)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(tune, "Tuner", boom)


def test_a_metric_the_runs_do_not_report_is_refused_at_load(tmp_path, monkeypatch):
    from kcd_ray.ray_layer.tune.sweep import run_sweep

    f = _write(tmp_path / "m.yaml", {"base": BASE, "metric": "top_1", "storage_path": str(tmp_path / "out")})
    _no_ray(monkeypatch)
    for call in (lambda: load_sweep(f), lambda: run_sweep(f)):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{f}: metric: 'top_1' is not a metric the runs report; one of: ")
        assert all(m in msg for m in ("top1", "best_top1", "final_top1", "val_loss", "compute_ratio", "loss_<term>"))
    assert not (tmp_path / "out").exists()
    # Every reported name is accepted, loss terms included; Tune's own keys and the run's strings are not metrics.
    for m in epoch_metrics()[0] + SUMMARY_KEYS + ("loss_kd", "loss_ce", "stage", "group_top1_2"):
        assert load_sweep({"base": BASE, "metric": m, "select_on_test": True}).metric == m
    for bad in ("loss_", "training_iteration", "kind", "Top1"):
        with pytest.raises(ConfigError, match=f"metric: '{bad}'"):
            load_sweep({"base": BASE, "metric": bad})
    # The shipped sweeps name reported metrics.
    for p in sorted(Path(__file__).resolve().parents[1].glob("experiments/sweeps/*.yaml")):
        sw = load_sweep(p)
        assert is_reported_metric(sw.metric) and (sw.asha is None or is_epoch_metric(sw.asha["metric"])), p


def test_a_missing_teacher_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    from kcd_ray.cli import main
    from kcd_ray.ray_layer.tune.sweep import run_sweep

    missing = tmp_path / "teachers" / "nope.pt"
    f = _write(tmp_path / "t.yaml", {"base": {**BASE, "distill": {"teacher": str(missing)}},
                                    "space": {"kcd.rho": [0.5, 0.7]}, "storage_path": str(tmp_path / "out")})
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError) as e:
        run_sweep(f)
    assert str(e.value) == f"{f}: distill.teacher: teacher file {missing} does not exist"
    assert not (tmp_path / "out").exists()  # nothing written either
    assert main(["sweep", "--config", str(f)]) == 2  # the CLI: one line, exit 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "distill.teacher" in err and str(missing) in err and str(f) in err
    with pytest.raises(ConfigError, match=r"distill\.teacher: not set"):
        run_sweep({"base": BASE, "storage_path": str(tmp_path / "out")})
    # A teacher listed in the space must exist too; the base's only matters when it is still used.
    teacher = _write(tmp_path / "teacher.pt", "x")
    with pytest.raises(ConfigError, match=rf"space\.distill\.teacher: teacher file {tmp_path / 'gone.pt'} does not"):
        run_sweep({"base": BASE, "space": {"distill.teacher": [str(teacher), str(tmp_path / "gone.pt")]},
                   "storage_path": str(tmp_path / "out")})
    # kind: teacher needs no teacher file.
    from kcd_ray.sweeps.spec import check_before_ray

    check_before_ray(load_sweep({"base": BASE, "kind": "teacher"}))
    check_before_ray(load_sweep({"base": BASE, "space": {"distill.teacher": [str(teacher)]}}))


def test_base_recipe_relative_to_sweep_file_and_overrides(tmp_path):
    _write(tmp_path / "recipes" / "r.yaml", {**BASE, "model": "resnet8", "distill": {"teacher": "t/teacher.pt"}})
    f = _write(tmp_path / "sweeps" / "rho.yaml", {
        "base": "../recipes/r.yaml", "overrides": {"optim.lr": 0.02, "kcd.interval": 1},
        "space": {"kcd.rho": [0.6, 0.8], "optim.lr": {"loguniform": [0.01, 0.1]}}})
    sw = load_sweep(f, overrides=["num_samples=3", "optim.epochs=5", "search=random"],
                    storage_path=str(tmp_path / "out"))
    assert sw.name == "rho" and sw.num_samples == 3 and sw.search == "random"
    assert sw.base["model"] == "resnet8" and sw.base["optim"]["lr"] == 0.02 and sw.base["optim"]["epochs"] == 5
    assert sw.base["kcd"]["interval"] == 1
    # Relative paths are fixed against the working folder: Tune trials run in their own folders.
    assert Path(sw.base["distill"]["teacher"]).is_absolute()
    assert sw.folder == tmp_path / "out" / "rho"
    # random search samples lists as choices; ranges stay ranges
    assert [(d.key, d.kind) for d in sw.dims] == [("kcd.rho", "choice"), ("optim.lr", "loguniform")]
    assert split_overrides(["seed=3", "kcd.rho=0.5"]) == ({"seed": 3}, ["kcd.rho=0.5"])
    with pytest.raises(ConfigError, match="command-line override kcd.rhoo"):
        load_sweep(f, overrides=["kcd.rhoo=1"])


def test_section_values_merge_and_trial_config(tmp_path):
    sw = load_sweep({"name": "t", "base": BASE, "storage_path": str(tmp_path), "include_kd_baseline": True,
                     "space": {"distill.temperature": [{"schedule": "linear", "T": 8.0, "T_end": 2.0}],
                               "distill.options.feat_dim": [64]}})
    payload = {"name": "t", "kind": "distill", "base": sw.base, "runs_dir": str(sw.runs_dir)}
    cfg = trial_config({"distill.temperature": {"schedule": "linear", "T": 8.0, "T_end": 2.0},
                        "distill.options.feat_dim": 64, "variant": "kcd"}, payload, "abc_00001")
    t = cfg.distill.temperature
    assert (t.schedule, t.T, t.T_end, t.milestones) == ("linear", 8.0, 2.0, [])  # unspecified keys keep the base
    assert cfg.distill.options == {"feat_dim": 64} and cfg.kcd.enabled
    assert cfg.run.name == "t_abc_00001" and cfg.run.storage_path == str(tmp_path / "t" / "runs")
    kd = trial_config({"variant": "kd"}, payload, "abc_00000")
    assert not kd.kcd.enabled and kd.run.name == "t_kd_abc_00000"
    assert apply_values({"a": {"b": 1, "c": 2}}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}}
    assert parse_space(None, sw.base) == []


def test_resources_and_concurrency():
    cfg = load_config(None, ["scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "scaling.data_cpus=0.25"])
    # driver 0.25 + worker 0.5 + two data tasks 0.5 = 1.25 CPU per trial
    assert derive_concurrency(cfg, 0.25, {"CPU": 2.5}) == 2 and derive_concurrency(cfg, 0.25, {"CPU": 2.0}) == 1
    assert derive_concurrency(cfg, 0.25, {"CPU": 0.5}) == 1  # never below one
    assert trial_resources(cfg, 0.25, {"CPU": 2.0}) == {"cpu": 0.25}  # Train V2 places the workers itself
    gpu = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=2", "scaling.use_gpu=auto"])
    assert derive_concurrency(gpu, 0.25, {"CPU": 64.0, "GPU": 4.0}) == 2  # GPUs bound it: 2 per trial
    assert derive_concurrency(gpu, 0.25, {"CPU": 64.0}) == 13  # no GPUs: auto means CPU (4.75 each)
    local = load_config(None, ["scaling.num_workers=0", "scaling.cpus_per_worker=1"])
    assert trial_resources(local, 0.25, {"CPU": 2.0}) == {"cpu": 1.0}  # the loop runs inside the trial
    # trials_at_once splits what is left after two data tasks per trial; GPUs fractionally
    assert share_of({"CPU": 2.0}, 2, 0.25) == {"cpu": 0.5, "gpu": 0.0}
    assert share_of({"CPU": 16.0, "GPU": 1.0}, 4, 0.25) == {"cpu": 3.5, "gpu": 0.25}
    assert trial_resources(local, 0.25, {"CPU": 16.0, "GPU": 1.0}, trials_at_once=4) == {"cpu": 3.5, "gpu": 0.25}


# --------------------------------------------------------------------------- report on written run folders


def _fake_run(folder: Path, rho: float | None, top1s: list[float], kept: list[float], done: bool = True) -> None:
    """A run folder in the layout kcd_ray.train writes (config.yaml, metrics.jsonl, summary.json)."""
    enabled = rho is not None
    cfg = to_dict(load_config(None, ["data.name=digits", f"kcd.enabled={str(enabled).lower()}",
                                     f"kcd.rho={rho or 0.7}", f"run.name={folder.name}"]))
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows, passes = [], 0
    for e, (t, k) in enumerate(zip(top1s, kept)):
        passes += int(100 * k)
        rows.append({"epoch": e, "top1": t, "top5": t + 10, "kept_fraction": k, "T": 4.0, "stage": e,
                     "train_loss": 2.0 / (e + 1), "loss_kd": 1.0 / (e + 1), "lr": 0.05,
                     "compute_ratio": passes / (100 * (e + 1)), "sample_passes": passes,
                     "wall_seconds": 1.5 * (e + 1), "kcd_enabled": enabled})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (folder / "summary.json").write_text(json.dumps({
            "final_top1": top1s[-1], "best_top1": max(top1s), "best_epoch": top1s.index(max(top1s)),
            "sample_passes": passes, "full_sample_passes": 100 * len(top1s),
            "compute_ratio": passes / (100 * len(top1s)),
            "wall_seconds": 1.5 * len(top1s), "epochs": len(top1s), "kind": "distill", "kcd_enabled": enabled,
            "config": cfg}))


def test_report_on_a_folder_of_runs(tmp_path):
    runs = tmp_path / "sw" / "runs"
    _fake_run(runs / "kd", None, [50, 70, 80], [1, 1, 1])
    _fake_run(runs / "r5", 0.5, [50, 60, 70], [1, 0.5, 0.5])  # cheapest: on the front
    _fake_run(runs / "r7", 0.7, [50, 69, 79], [1, 0.7, 0.7])  # on the front
    _fake_run(runs / "r9", 0.9, [50, 60, 65], [1, 0.9, 0.9])  # dominated by r7
    _fake_run(runs / "stopped", 0.6, [40], [0.5], done=False)  # stopped early: no summary.json, kept off the front
    res = report(tmp_path / "sw")
    rows = {r["run"]: r for r in res["rows"]}
    assert set(rows) == {"kd", "r5", "r7", "r9", "stopped"}
    assert res["varying"] == ["kcd.enabled", "kcd.rho"]  # run.name differs too, but is bookkeeping
    assert rows["kd"]["variant"] == "kd" and rows["r5"]["variant"] == "kcd"
    assert math.isclose(rows["r5"]["compute_ratio"], 2 / 3) and rows["kd"]["compute_ratio"] == 1.0
    assert rows["stopped"]["status"] == "incomplete" and rows["stopped"]["best_top1"] == 40
    assert {k for k, r in rows.items() if r["pareto"]} == {"kd", "r5", "r7"}
    assert res["best"]["run"] == "kd"  # best_top1, done runs only
    best = yaml.safe_load(res["best_config_yaml"])
    assert best["kcd"]["enabled"] is False and best["run"]["name"] == "sw-best"
    assert load_config(res["best_config_path"]).kcd.enabled is False  # `kcd-ray distill --config` loads it
    assert (tmp_path / "sw" / "trials.csv").read_text().count("\n") == 6
    assert (tmp_path / "sw" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "r7" in res["text"] and "compute_ratio" in res["text"]


def test_report_on_one_run(tmp_path):
    _fake_run(tmp_path / "one", 0.7, [10, 30, 20], [1, 0.85, 0.7])
    res = report(tmp_path / "one", out_dir=tmp_path / "out")
    assert res["kind"] == "run" and [r["epoch"] for r in res["rows"]] == [1, 2, 3]
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "best top-1 30 (epoch 2)" in res["text"] and "kept_fraction" in res["text"]
    with pytest.raises(FileNotFoundError):
        report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run folders"):
        report(tmp_path / "empty")


def test_pareto_and_table_helpers():
    assert pareto_flags([(1.0, 70), (0.8, 70), (0.5, 60), (0.9, 65)]) == [False, True, True, False]
    table = format_table([{"a": "x", "b": 0.123456}, {"a": "yy", "b": None}], ["a", "b"])
    assert table.splitlines()[2].split() == ["x", "0.1235"] and table.splitlines()[3].split() == ["yy", "-"]


def test_a_different_sweep_under_the_same_name_is_refused(tmp_path):
    from kcd_ray.ray_layer.tune.sweep import _write_spec

    sw = load_sweep({"name": "same", "base": BASE, "space": {"kcd.rho": [0.5]}, "storage_path": str(tmp_path)})
    _write_spec(sw)
    _write_spec(load_sweep({"name": "same", "base": BASE, "space": {"kcd.rho": [0.5]}, "storage_path": str(tmp_path)}))
    other = load_sweep({"name": "same", "base": BASE, "space": {"kcd.rho": [0.6]}, "storage_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="different sweep.*space"):
        _write_spec(other)


# --------------------------------------------------------------------------- a real sweep on Ray Tune


@pytest.mark.ray
@pytest.mark.timeout(400)
# ~25 s: the plain-KD baseline trial and a finished sweep restored on a re-run. The default run's Tune path is
# test_in_process_sweep_reports_every_epoch (grid, budgets, the cache, the report) and the ASHA test below.
@pytest.mark.slow
def test_two_trial_sweep_and_report(tmp_path, ray_session):
    from kcd_ray.models import build_model, save_model
    from kcd_ray.ray_layer.tune.sweep import run_sweep

    teacher = tmp_path / "teacher.pt"
    save_model(teacher, build_model("resnet8", 10))  # untrained: the sweep machinery is under test
    epochs = 2
    sweep = {
        "name": "tiny", "storage_path": str(tmp_path / "sweeps"), "include_kd_baseline": True,
        "base": {"model": "resnet8", "data": {"name": "digits", "image_size": 8, "root": str(tmp_path / "data"),
                                              "val_fraction": 0.2},
                 "optim": {"epochs": epochs, "batch_size": 128, "eval_batch_size": 512},
                 "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
                 "run": {"verbose": 0},
                 "distill": {"teacher": str(teacher)},
                 "kcd": {"interval": 1, "stages": 1}},
        "space": {"kcd.rho": [0.5]},  # + the plain-KD baseline = 2 trials
    }
    folder = run_sweep(sweep)
    res = report(folder)
    rows = {r["variant"]: r for r in res["rows"]}
    assert len(res["rows"]) == 2 and set(rows) == {"kd", "kcd"}, res["text"]
    assert all(r["status"] == "done" for r in res["rows"])
    n = json.loads(next((folder / "runs").glob("*/summary.json")).read_text())["num_train"]
    # KCD (docs/methods/kcd.md §4, one stage): epoch 0 on all N samples, epoch 1 on max(N - floor(N/2), floor(N/2));
    # KD: N each epoch.
    kept = max(n - math.floor(n * 0.5), math.floor(0.5 * n))
    assert math.isclose(rows["kcd"]["compute_ratio"], (n + kept) / (epochs * n), rel_tol=1e-6)
    assert rows["kd"]["compute_ratio"] == 1.0
    assert "compute_ratio" in res["text"] and rows["kcd"]["run"] in res["text"]
    assert (folder / "pareto.png").is_file() and (folder / "tune").is_dir()
    # Re-running the same command restores the finished sweep instead of running it again.
    mtimes = {p: p.stat().st_mtime for p in (folder / "runs").glob("*/summary.json")}
    assert run_sweep(sweep) == folder
    assert {p: p.stat().st_mtime for p in (folder / "runs").glob("*/summary.json")} == mtimes


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_in_process_sweep_reports_every_epoch(tmp_path, ray_session, capsys):
    """scaling.num_workers=0: each trial runs fit() in its own process, as a run does, and reports each epoch. A
    grid over budgets x strategies leaves out the points a strategy cannot reach (plain KD at 0.75). The sweep
    builds the exact teacher-output cache once, and its trials run no teacher forward (KCD without summary blends:
    a blended image is new, so it is never in the cache)."""
    from kcd_ray.cache.store import read_manifest
    from kcd_ray.models import build_model, save_model
    from kcd_ray.ray_layer.tune.sweep import run_sweep

    teacher = tmp_path / "teacher.pt"
    save_model(teacher, build_model("resnet8", 10))
    epochs = 2
    sweep = {
        "name": "inproc", "storage_path": str(tmp_path / "sweeps"),
        "base": {"model": "resnet8", "data": {"name": "digits", "image_size": 8, "root": str(tmp_path / "data"),
                                              "val_fraction": 0.2},
                 "optim": {"epochs": epochs, "batch_size": 128, "eval_batch_size": 512},
                 "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
                 "run": {"verbose": 0}, "kcd": {"interval": 1, "stages": 1, "summary": False},
                 "distill": {"teacher": str(teacher), "cache": "exact", "cache_dir": str(tmp_path / "cache")}},
        "space": {"selection.strategy": ["kcd", "none"], "selection.budget": [0.75, 1.0]},
        "metric": "best_top1", "select_on_test": True, "trials_at_once": 2,  # each trial half of what data leaves
        "asha": {"grace_period": epochs},  # ASHA runs on the per-epoch results, and stops nothing here
    }
    folder = run_sweep(sweep)
    assert "left out selection.strategy=none, selection.budget=0.75: selection.budget: 0.75 is not what" in \
        capsys.readouterr().out
    res = report(folder)
    assert len(res["rows"]) == 3 and all(r["status"] == "done" for r in res["rows"]), res["text"]
    summaries = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*/summary.json"))]
    points = sorted((s["strategy"], s["budget"]) for s in summaries)
    assert points == [("kcd", 0.75), ("kcd", 1.0), ("none", 1.0)]
    assert all(abs(s["compute_ratio"] - s["budget"]) <= 0.02 for s in summaries), summaries
    assert sorted(s["config"]["kcd"]["rho"] for s in summaries if s["strategy"] == "kcd")[1] == 1.0
    assert any(f.name.startswith("best_config_budget0.75") for f in folder.iterdir())
    assert all(s["epochs"] == epochs and s["config"]["optim"]["threads"] == 1 for s in summaries)
    builds = read_manifest(tmp_path / "cache")["builds"]
    assert len(builds) == 1 and builds[0]["teacher_forwards"] == epochs * summaries[0]["num_train"], builds
    for trial in (folder / "tune").glob("*/result.json"):
        results = [json.loads(line) for line in trial.read_text().splitlines()]
        # One result per epoch (through the engine hook), then the trial's summary.
        assert [r["epoch"] for r in results] == [*range(epochs), epochs - 1], trial
        assert "final_top1" in results[-1] and all("top1" in r and "best_top1" in r for r in results)
    # The metric names load_sweep accepts are what a run's rows hold (numeric keys; loss terms by prefix).
    rows = [json.loads(line) for s in summaries
            for line in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * epochs and all(r["teacher_forward_samples"] == 0 for r in rows), rows
    for row in rows:
        numeric = {k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert all(is_epoch_metric(k) for k in numeric), sorted(k for k in numeric if not is_epoch_metric(k))
        assert set(ENGINE_COLUMNS) <= set(row), sorted(set(ENGINE_COLUMNS) - set(row))


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_asha_stops_a_trial_early_and_the_sweep_finishes_without_calling_it_interrupted(tmp_path, ray_session):
    """Tune reports a trial ASHA stopped as it reports one Ctrl-C stopped (TERMINATED, its run folder still
    "running"). The scheduler's note tells them apart: the sweep ends normally, the report says "stopped early" and
    chooses among the finished trials. One trial at a time: the second (lr 1e-6: it barely learns) meets the first's
    validation top-1 at the rung (epoch 1 of 3) and is stopped there. The teacher is untrained, so the loss is
    cross-entropy alone (alpha 0): the first trial learns (16 px, batch 32), the second stays at chance."""
    from kcd_ray.models import build_model, save_model
    from kcd_ray.ray_layer.tune.sweep import run_sweep

    teacher = tmp_path / "teacher.pt"
    save_model(teacher, build_model("resnet8", 10))
    base = {"model": "resnet8", "data": {"name": "digits", "image_size": 16, "root": str(tmp_path / "data"),
                                         "val_fraction": 0.2},
            "optim": {"epochs": 3, "batch_size": 32, "eval_batch_size": 512, "lr": 0.05},
            "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "run": {"verbose": 0}, "distill": {"teacher": str(teacher), "alpha": 0.0, "gamma": 1.0},
            "selection": {"strategy": "none"}}
    folder = run_sweep({"name": "asha", "storage_path": str(tmp_path / "sweeps"), "base": base,
                        "space": {"optim.lr": [0.05, 1e-6]}, "max_concurrent_trials": 1,
                        "asha": {"grace_period": 1, "reduction_factor": 2}})
    res = report(folder)
    status = {r["optim.lr"]: r["status"] for r in res["rows"]}
    assert status == {0.05: "done", 1e-6: "stopped early"}, res["text"]
    stopped = next(p for p in (folder / "runs").iterdir() if (p / "stopped_early.json").is_file())
    assert json.loads((stopped / "status.json").read_text())["state"] == "stopped_early"
    assert [json.loads(x)["epoch"] for x in (stopped / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert res["best"]["optim.lr"] == 0.05


def test_sweeps_select_on_validation_and_refuse_test_metrics_unless_told(tmp_path):
    """The default metric is the last epoch's validation top-1; a test metric is refused (naming the key and the
    way out) unless the sweep says select_on_test; a validation metric needs a validation split."""
    assert load_sweep({"base": BASE}).metric == "val_top1"
    for key, sweep in (("metric", {"metric": "best_top1"}), ("asha.metric", {"asha": {"metric": "top1"}}),
                       ("objectives[0].metric", {"search": "optuna", "objectives": [
                           {"metric": "final_top1", "mode": "max"}, {"metric": "compute_ratio", "mode": "min"}]})):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: '\w+' is measured on the test split.*"
                                              r"select_on_test: true"):
            load_sweep({"base": BASE, **sweep})
    assert load_sweep({"base": BASE, "metric": "best_top1", "select_on_test": True}).metric == "best_top1"
    no_val = {**BASE, "data": {"name": "digits", "image_size": 16}}
    with pytest.raises(ConfigError, match=r"metric: 'val_top1' needs a validation split.*data.val_fraction"):
        load_sweep({"base": no_val})
    assert load_sweep({"base": no_val, "select_on_test": True}).metric == "top1"  # the labelled fallback
    sw = load_sweep({"base": BASE, "search": "optuna", "objectives": [{"metric": "val_top1", "mode": "max"},
                                                                      {"metric": "compute_ratio", "mode": "min"}]})
    assert sw.objectives == (("val_top1", "max"), ("compute_ratio", "min")) and sw.metric == "val_top1"
    with pytest.raises(ConfigError, match="objectives: a multi-objective search needs search: optuna"):
        load_sweep({"base": BASE, "objectives": [{"metric": "val_top1"}, {"metric": "compute_ratio", "mode": "min"}]})
