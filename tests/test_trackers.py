"""run.trackers: TensorBoard events and an MLflow run written by rank 0, read back with the libraries' own readers.

The engine runs in-process on plain batch lists (as in test_engine.py: no Ray), then one real ``fit()``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from engine_harness import batches, tiny_set
from kcd_ray.config import ConfigError, load_config, to_dict
from kcd_ray.engine import Engine, LocalServices, RunContext, build_hooks
from kcd_ray.engine.assemble import run_hooks
from kcd_ray.engine.build import build_components
from kcd_ray.engine.plan import local_plan
from kcd_ray.engine.rundir import RunDir
from kcd_ray.engine.trackers import Trackers, epoch_metrics, flat_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPOCHS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_set(tmp_path_factory.mktemp("trackers"), num_train=64, num_test=32, optim={"epochs": EPOCHS},
                    run={"trackers": ["tensorboard", "mlflow"]}, kcd={"interval": 1, "stages": 2, "rho": 0.5})


def _cfg(tiny, **over):
    return load_config(base=copy.deepcopy(tiny["base"]), overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


_batches = batches


def _engine(tiny, cfg, run_dir: Path, before_trackers=()):
    """An engine with the production hooks; ``before_trackers``: test hooks placed just before the trackers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext.from_plan(local_plan(cfg, "distill", tiny["data_dir"], run_dir))
    torch.manual_seed(cfg.optim.seed)
    parts = build_components(ctx, torch.device("cpu"), distributed=False)
    hooks = run_hooks(ctx, parts.num_train)
    at = next(i for i, h in enumerate(hooks) if isinstance(h, Trackers)) if cfg.run.trackers else len(hooks)
    hooks[at:at] = list(before_trackers)
    services = LocalServices(checkpoint_dir=run_dir / "local_checkpoint")
    return Engine(ctx, parts, hooks, services, torch.device("cpu"))


def _run(tiny, engine):
    services, bs = engine.services, engine.cfg.optim.batch_size
    return engine.run(lambda epoch: _batches(tiny["split"]["train"], bs, epoch, keep=services.mask[0]),
                      lambda: _batches(tiny["split"]["test"], 32, 0))


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


# --------------------------------------------------------------------------- one interrupted, resumed run


@pytest.fixture(scope="module")
def resumed_run(tiny, tmp_path_factory):
    """A 3-epoch run that crashes after epoch 1's checkpoint but before the trackers logged epoch 1 (the worst
    moment), then resumes in a new engine (new hook objects: the MLflow run id comes from the checkpoint)."""
    run = tmp_path_factory.mktemp("resume") / "run"
    cfg = _cfg(tiny, **{"run.name": "tracked"})
    crash = build_hooks([("fail", {"epoch": 1, "mode": "raise"})])
    with pytest.raises(RuntimeError, match="injected failure after epoch 1"):
        _run(tiny, _engine(tiny, cfg, run, before_trackers=crash))
    client = _mlflow(run / "mlflow.db")
    (first,) = [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("kcd_ray").experiment_id])]
    again = _engine(tiny, cfg, run)
    again.restore(again.services.latest_checkpoint())
    assert again.start_epoch == 2
    summary = _run(tiny, again)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"run": run, "cfg": cfg, "summary": summary, "rows": rows, "first_run_id": first}


def test_tensorboard_has_every_epoch_once_with_the_metrics_values(resumed_run):
    rows = resumed_run["rows"]
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    scalars = _tb_scalars(resumed_run["run"] / "tensorboard")
    expected = {k for r in rows for k in epoch_metrics(r)}
    assert {"top1", "top5", "train_loss", "kept_fraction", "lr", "T", "sample_passes"} <= expected
    assert set(scalars) == expected
    for key in expected:
        steps = [s for s, _ in scalars[key]]
        assert steps == sorted(set(steps)), f"{key}: duplicated or unordered steps {steps}"
        logged = dict(scalars[key])
        for r in rows:
            if key in epoch_metrics(r):
                assert math.isclose(logged[r["epoch"]], r[key], rel_tol=1e-6, abs_tol=1e-6), (key, r["epoch"])
    # the crash happened after epoch 1 was checkpointed and before the tracker logged it: the resume did
    assert [s for s, _ in scalars["top1"]] == [0, 1, 2]


def test_mlflow_run_continues_with_metrics_params_and_artifacts(resumed_run):
    client = _mlflow(resumed_run["run"] / "mlflow.db")
    exp = client.get_experiment_by_name("kcd_ray")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "a resumed run continues its MLflow run"
    run = runs[0]
    assert run.info.run_id == resumed_run["first_run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags["kcd_ray.run_dir"] == str(resumed_run["run"])
    rows = resumed_run["rows"]
    for key in {k for r in rows for k in epoch_metrics(r)}:
        hist = client.get_metric_history(run.info.run_id, key)
        steps = sorted(m.step for m in hist)
        assert steps == sorted(set(steps)), f"{key}: an epoch was logged twice: {steps}"
        got = {m.step: m.value for m in hist}
        assert got == {r["epoch"]: float(r[key]) for r in rows if key in epoch_metrics(r)}, key
    # the resolved config, flattened to dotted keys
    params = run.data.params
    assert params == flat_params(to_dict(resumed_run["cfg"]))
    assert params["kcd.rho"] == "0.5" and params["optim.epochs"] == str(EPOCHS)
    assert params["run.trackers"] == "['tensorboard', 'mlflow']"
    summary = json.loads((resumed_run["run"] / "summary.json").read_text())
    assert run.data.metrics["summary.final_top1"] == summary["final_top1"]
    assert run.data.metrics["summary.compute_ratio"] == summary["compute_ratio"]
    arts = _artifacts(client, run.info.run_id)
    assert {"summary.json", "final_model.pt", "best_model.pt", "metrics.jsonl", "plots/curves.png"} <= arts
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(resumed_run["run"] / "dl")))
    assert json.loads(local.read_text())["final_top1"] == resumed_run["summary"]["final_top1"]


def test_trackers_state_is_in_the_checkpoint(resumed_run):
    from kcd_ray.engine.checkpoint import load_run_checkpoint

    state = load_run_checkpoint(resumed_run["run"] / "local_checkpoint")["hooks"]["trackers"]
    assert state["mlflow_run_id"] == resumed_run["first_run_id"]
    assert state["tracking_uri"] == f"sqlite:///{resumed_run['run'] / 'mlflow.db'}"


def test_trackers_turned_on_at_a_resume_get_the_whole_history(tiny, tmp_path):
    """run.* may change on a resume: a run resumed with trackers logs the epochs trained before them too."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(tiny, _engine(tiny, _cfg(tiny, **{"run.trackers": []}), run,
                           before_trackers=build_hooks([("fail", {"epoch": 0, "mode": "raise"})])))
    assert not (run / "tensorboard").exists() and not (run / "mlflow.db").exists()
    again = _engine(tiny, _cfg(tiny), run)
    again.restore(again.services.latest_checkpoint())
    _run(tiny, again)
    assert [s for s, _ in _tb_scalars(run / "tensorboard")["top1"]] == [0, 1, 2]
    client = _mlflow(run / "mlflow.db")
    (mrun,) = client.search_runs([client.get_experiment_by_name("kcd_ray").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(mrun.info.run_id, "top1")) == [0, 1, 2]


# --------------------------------------------------------------------------- sweeps, one tracker, errors


def test_sweep_trial_is_tagged_and_shares_the_sweep_store(tiny, tmp_path):
    from kcd_ray.sweeps.spec import load_sweep
    from kcd_ray.ray_layer.tune.sweep import trial_config

    sw = load_sweep({"name": "sw", "base": tiny["base"], "storage_path": str(tmp_path), "search": "grid",
                     "overrides": {"optim.epochs": 1, "run.trackers": ["mlflow"]},
                     "space": {"kcd.rho": [0.5, 0.9]}, "select_on_test": True})  # no validation split here
    payload = {"name": "sw", "kind": "distill", "base": sw.base, "runs_dir": str(sw.runs_dir)}
    for trial, variant in (("ab12_00000", "kd"), ("ab12_00001", "kcd")):
        cfg = trial_config({"kcd.rho": 0.9, "variant": variant}, payload, trial)
        assert cfg.run.sweep == "sw" and cfg.run.trackers == ["mlflow"]
        _run(tiny, _engine(tiny, cfg, Path(cfg.run.storage_path) / cfg.run.name))
    assert not (sw.runs_dir / "sw_ab12_00001" / "tensorboard").exists()  # tensorboard was not asked for
    client = _mlflow(sw.folder / "mlflow.db")  # <sweep folder>/mlflow.db: one store, one experiment
    exp = client.get_experiment_by_name("sw")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"sw_kd_ab12_00000", "sw_ab12_00001"}
    tags = runs["sw_ab12_00001"].data.tags
    assert (tags["kcd_ray.sweep"], tags["kcd_ray.trial_id"]) == ("sw", "ab12_00001")
    assert runs["sw_kd_ab12_00000"].data.tags["kcd_ray.trial_id"] == "ab12_00000"
    assert runs["sw_kd_ab12_00000"].data.tags["kcd_ray.variant"] == "kd"
    assert runs["sw_ab12_00001"].data.params["kcd.rho"] == "0.9"
    assert runs["sw_kd_ab12_00000"].data.params["kcd.enabled"] == "False"


@pytest.mark.parametrize("tracker", ["mlflow", "tensorboard"])
def test_missing_library_is_one_line_naming_the_key_and_the_extra(tiny, tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import <tracker>` now raises ImportError
    cfg = _cfg(tiny, **{"run.trackers": [tracker]})
    with pytest.raises(ConfigError) as err:
        _engine(tiny, cfg, tmp_path / "run")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("run.trackers:") and "kcd_ray[tracking]" in msg and tracker in msg
    # a worker that is not rank 0 never imports it
    ctx = RunContext(cfg=cfg, kind="distill", run_dir=RunDir(tmp_path), data_dir=tiny["data_dir"], rank=1, world=2)
    assert isinstance(run_hooks(ctx, 64)[-1], Trackers)


def test_config_checks_each_tracker_name():
    assert load_config(overrides=["run.trackers=[mlflow]"]).run.trackers == ["mlflow"]
    assert load_config().run.trackers == []  # off by default
    with pytest.raises(ConfigError, match=r"run.trackers: 'wandb' is not one of: tensorboard, mlflow"):
        load_config(overrides=["run.trackers=[tensorboard, wandb]"])


# --------------------------------------------------------------------------- a real fit()


@pytest.mark.ray
def test_fit_in_process_with_both_trackers(ray_session, tmp_path):
    from kcd_ray.ray_layer.trainer import fit

    cfg = load_config(base={
        "model": "resnet8", "data": {"name": "digits", "image_size": 16, "root": str(tmp_path.parent / "kcd_data")},
        "optim": {"epochs": 2, "batch_size": 128, "threads": 1, "eval_batch_size": 512},
        "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "fit", "verbose": 0,
                "trackers": ["tensorboard", "mlflow"], "experiment": "digits"}})
    summary = fit(cfg, kind="teacher")
    run = Path(summary["run_dir"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = _tb_scalars(run / "tensorboard")
    assert [s for s, _ in scalars["top1"]] == [0, 1]
    assert all(math.isclose(v, rows[s]["top1"], rel_tol=1e-6) for s, v in scalars["top1"])
    client = _mlflow(run / "mlflow.db")
    (mrun,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert mrun.info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "top1")} == \
        {r["epoch"]: r["top1"] for r in rows}
    assert mrun.data.params["run.storage_path"] == str(tmp_path / "runs")
    assert {"summary.json", "final_model.pt", "config.yaml", "plots/curves.png"} <= _artifacts(client, mrun.info.run_id)
