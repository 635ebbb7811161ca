"""Object storage (s3://) against a real S3-compatible server on loopback: moto's standalone server (``moto_server``,
from the test extras), started once for the module. No S3 call is mocked: pyarrow's S3 client talks HTTP to it.

The endpoint and dummy credentials are set when this module is imported, before the session's Ray starts, so
Ray's worker processes (Ray Data tasks reading blend overlays) inherit them as the nodes of a cluster would. Tests
that play "another node" point KCD_RAY_STAGE (where a process keeps its working copies) at an empty folder.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from kcd_ray import storage
from kcd_ray.config import load_config


from conftest import BUCKET, ENDPOINT, PORT, free_port as _free_port  # noqa: E402,F401 - the moto server's


def test_storage_module_round_trip(s3, tmp_path, monkeypatch):
    uri = storage.join(s3, "unit", "a", "b.json")
    storage.write_text(uri, json.dumps({"x": 1}))
    assert json.loads(storage.read_text(uri)) == {"x": 1} and storage.exists(uri)
    storage.write_text(uri, "rewritten")  # an object is replaced whole (metrics.jsonl is rewritten like this)
    assert storage.read_text(uri) == "rewritten"
    storage.write_bytes(storage.join(s3, "unit", "c.bin"), b"\x00\x01")
    assert storage.list_files(storage.join(s3, "unit")) == ["a/b.json", "c.bin"]
    assert storage.list_files(storage.join(s3, "nothing-here")) == []
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match="unit/a/b.json"):
        storage.read_text(uri)
    # fetch: a local working copy, fetched again only when the stored object changes
    monkeypatch.setenv("KCD_RAY_STAGE", str(tmp_path / "stage"))
    obj = storage.join(s3, "unit", "c.bin")
    copy = storage.fetch(obj)
    assert copy.is_relative_to(tmp_path / "stage") and copy.read_bytes() == b"\x00\x01"
    copy.write_bytes(b"\x09\x09")  # marks the copy: an unchanged object is not downloaded again
    assert storage.fetch(obj).read_bytes() == b"\x09\x09"
    storage.write_bytes(obj, b"\x02\x03\x04")
    assert storage.fetch(obj).read_bytes() == b"\x02\x03\x04"
    with pytest.raises(FileNotFoundError, match="unit/none.pt"):
        storage.fetch(storage.join(s3, "unit", "none.pt"))
    # a local path goes through the same calls, written beside the target and renamed (no temp file left)
    local = tmp_path / "d" / "e.txt"
    storage.write_text(local, "local")
    assert local.read_text() == "local" and [p.name for p in local.parent.iterdir()] == ["e.txt"]


def test_missing_bucket_and_unreachable_endpoint_are_one_line_naming_the_uri(s3, monkeypatch, capsys):
    storage.check(storage.join(s3, "runs"), "run.storage_path")  # the bucket exists: no error
    with pytest.raises(storage.StorageError) as e:
        storage.check("s3://no-such-bucket/runs", "run.storage_path")
    assert "s3://no-such-bucket/runs" in str(e.value) and "does not exist" in str(e.value)
    assert "\n" not in str(e.value)
    # an unreachable endpoint (nothing listens there), through the CLI: one line, exit code 2, before anything is
    # prepared or started
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    from kcd_ray.cli import main

    capsys.readouterr()
    assert main(["distill", "data.name=digits", f"run.storage_path={s3}/runs", "distill.teacher=/nonexistent.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"run.storage_path: {s3}/runs: cannot reach" in err, err


def _cfg(s3, tmp_path, teacher, **over):
    base = {
        "model": "resnet8",
        "data": {"name": "digits", "image_size": 8, "root": f"{s3}/data"},
        "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05, "scheduler": "cosine", "threads": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "data_cpus": 0.25},
        "run": {"storage_path": f"{s3}/runs", "verbose": 0, "name": "kcd"},
        "distill": {"teacher": str(teacher)},
        "kcd": {"interval": 1, "stages": 2, "rho": 0.5, "value_fn": "random"},
    }
    return load_config(base=base, overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


@pytest.fixture(scope="module")
def prepared(s3, tmp_path_factory):
    """digits 8x8 prepared into the bucket by `kcd-ray prepare-data`."""
    from kcd_ray.cli import main

    assert main(["prepare-data", "data.name=digits", "data.image_size=8", f"data.root={s3}/data"]) == 0
    return f"{s3}/data/digits-8"


def test_prepare_data_to_s3_and_fetch_on_another_node(prepared, tmp_path, monkeypatch):
    files = storage.list_files(prepared)
    assert "meta.json" in files and any(f.startswith("train/part-") for f in files)
    meta = json.loads(storage.read_text(storage.join(prepared, "meta.json")))
    assert meta["splits"]["train"]["num_rows"] == 1347
    from kcd_ray.data.prepare import fetch_prepared

    monkeypatch.setenv("KCD_RAY_STAGE", str(tmp_path / "other-node"))  # a node that has never seen it
    local = fetch_prepared(prepared, verbose=False)
    assert local.is_relative_to(tmp_path / "other-node") and storage.staged_from(local) == prepared
    assert pq.read_table(local / "train").num_rows == 1347
    # the Ray Data read of a working copy goes to the store itself
    fs, where = storage.parquet_source(local / "train")
    assert fs is not None and where == f"{BUCKET}/data/digits-8/train"


@pytest.fixture(scope="module")
def s3_run(s3, prepared, ray_session, tmp_path_factory, one_torch_thread):
    """KD+KCD on one Ray Train worker, run folder and checkpoints in the bucket. Its worker process dies after
    epoch 0 (a real crash: the fit fails), then the same command, on a node whose working copies are empty,
    resumes from the checkpoint and files in the store and finishes. Returns (summary, error of the first fit)."""
    from kcd_ray.models import build_model, save_model
    from kcd_ray.ray_layer.trainer import fit

    tmp = tmp_path_factory.mktemp("s3run")
    teacher = save_model(tmp / "teacher.pt", build_model("resnet8", 10))
    cfg = _cfg(s3, tmp, teacher)
    with pytest.raises(Exception) as died:
        fit(cfg, kind="distill", hooks=[("fail", {"epoch": 0, "mode": "exit"})])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KCD_RAY_STAGE", str(tmp / "fresh-node"))
        summary = fit(cfg, kind="distill")
    return summary, died.value


def _rows(uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(uri, "metrics.jsonl")).splitlines()]


def test_kcd_distill_writes_everything_to_s3_and_resumes_after_a_worker_death(s3_run, s3, tmp_path):
    summary, died = s3_run
    run = f"{s3}/runs/kcd"
    assert summary["run_dir"] == run
    files = storage.list_files(run)
    assert "injected_failure_epoch_0" in files  # the worker process really died, and its marker reached the store
    assert "error.log" in files
    history = [json.loads(x) for x in storage.read_text(storage.join(run, "history.jsonl")).splitlines()]
    assert [(h["event"], h["start_epoch"]) for h in history] == [("start", 0), ("resume", 1)], history
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [0, 1]  # each epoch once, across the death and the resume
    stored = json.loads(storage.read_text(storage.join(run, "summary.json")))
    assert stored["final_top1"] == summary["final_top1"] == rows[-1]["top1"]
    assert stored["sample_passes"] == sum(r["samples_seen"] for r in rows)
    for f in ("config.yaml", "status.json", "final_model.pt", "masks/mask_v001.parquet",
              "masks/mask_final.parquet", "checkpoint_epoch_0001/state.pt", "checkpoint_epoch_0001/model.pt",
              "checkpoint_epoch_0000/state.pt"):
        assert f in files, f
    assert any(f.startswith("blends/v000001/bucket-") for f in files)  # the overlay Ray Data read from the store
    assert json.loads(storage.read_text(storage.join(run, "status.json")))["state"] == "finished"
    mask = pq.read_table(storage.open_input(storage.join(run, "masks/mask_v001.parquet"))).to_pydict()
    assert sum(mask["kept"]) == rows[1]["kept_fraction"] * len(mask["kept"])
    from kcd_ray.models import load_model

    (tmp_path / "final_model.pt").write_bytes(storage.read_bytes(storage.join(run, "final_model.pt")))
    assert load_model(tmp_path / "final_model.pt").arch == "resnet8"


@pytest.mark.slow  # ~35 s; the default run's S3 path is the distill above, its Tune path tests/test_tune.py
def test_sweep_in_s3_and_its_report(s3_run, s3, tmp_path):
    """`kcd-ray sweep` with its folder in the bucket: two in-process trials write their run folders there, Tune its
    experiment state, and the teacher-output cache is built once, beside the data set in the bucket, and read by
    every trial (no teacher forward); `kcd-ray report` on the sweep's URI writes the table, CSV, plot and best config
    beside it, the best config pointing back at the store. Re-running the finished sweep restores it from the store."""
    from kcd_ray.cli import main

    summary, _ = s3_run
    base = {"model": "resnet8", "data": {"name": "digits", "image_size": 8, "root": f"{s3}/data", "val_fraction": 0.2},
            "optim": {"epochs": 2, "batch_size": 128, "threads": 1},
            "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "run": {"storage_path": f"{s3}/runs", "verbose": 0},
            "distill": {"teacher": summary["config"]["distill"]["teacher"], "cache": "exact"},
            "selection": {"strategy": "kcd"},
            # no VAKS blends: a blended image is new, so its teacher output is not in the cache
            "kcd": {"interval": 1, "stages": 1, "value_fn": "random", "summary": False}}
    f = tmp_path / "sw.yaml"  # a validation split and compute budgets, the data set, cache and runs in the store
    f.write_text(yaml.safe_dump({"name": "sw", "base": base, "space": {"selection.budget": [0.75, 1.0]},
                                 "storage_path": f"{s3}/sweeps"}))
    assert main(["sweep", "--config", str(f), "--no-report"]) == 0
    sweep = f"{s3}/sweeps/sw"
    files = storage.list_files(sweep)
    trials = sorted({x.split("/")[1] for x in files if x.startswith("runs/") and x.endswith("/summary.json")})
    assert len(trials) == 2 and "sweep.yaml" in files and any(x.startswith("tune/") for x in files), files
    (manifest,) = [x for x in storage.list_files(f"{s3}/data/digits-8-val0.2-s0") if x.endswith("manifest.json")]
    assert manifest.startswith("teacher_cache/")
    budgets = set()
    for t in trials:
        rows = _rows(f"{sweep}/runs/{t}")
        assert all(r["teacher_forward_samples"] == 0 and r["val_top1"] is not None for r in rows), (t, [
            (r["epoch"], r["teacher_forward_samples"], r["val_top1"]) for r in rows])
        assert rows[0]["samples_seen"] == 1078  # the 1,347 training images less the validation split
        trial = json.loads(storage.read_text(f"{sweep}/runs/{t}/summary.json"))
        assert abs(trial["compute_ratio"] - trial["budget"]) <= 0.02
        budgets.add(trial["budget"])
    assert budgets == {0.75, 1.0}
    assert main(["sweep", "--config", str(f), "--no-report"]) == 0  # restored: nothing left to run
    assert sorted({x.split("/")[1] for x in storage.list_files(sweep) if x.endswith("/summary.json")}) == trials
    assert main(["report", sweep]) == 0
    assert {"trials.csv", "pareto.png", "best_config.yaml"} <= set(storage.list_files(sweep))
    assert f"storage_path: {s3}/runs" in storage.read_text(storage.join(sweep, "best_config.yaml"))
    rows = storage.read_text(storage.join(sweep, "trials.csv")).splitlines()
    assert len(rows) == 3 and {r.split(",")[0] for r in rows[1:]} == set(trials)
    run = f"{s3}/runs/kcd"
    assert main(["report", run]) == 0  # one run: the per-epoch table
    assert {"epochs.csv", "curves.png"} <= set(storage.list_files(run))
    assert len(storage.read_text(storage.join(run, "epochs.csv")).splitlines()) == 3  # header + 2 epochs


def test_ed_trains_its_group_teachers_into_the_store_and_the_student_loads_them_from_it(s3, prepared, ray_session,
                                                                                         one_torch_thread):
    """ED with per-group teachers and run.storage_path in the bucket: the missing teachers are trained into it, the
    student's config lists their URIs, and the student (a Ray Train run) loads them from the store."""
    from kcd_ray.models import load_model
    from kcd_ray.ray_layer.trainer import fit

    base = {"model": "resnet8", "data": {"name": "digits", "image_size": 8, "root": f"{s3}/data"},
            "optim": {"epochs": 2, "batch_size": 128, "lr": 0.05, "threads": 1},
            "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "run": {"storage_path": f"{s3}/ed-runs", "verbose": 0, "name": "ed-student"},
            "kcd": {"enabled": False}, "distill": {"method": "ed"},
            "curriculum": {"name": "ed", "groups": 2, "grade_epochs": [1, 1], "mix_groups": True,
                           "teacher_model": "resnet8", "teacher_epochs": 1}}
    summary = fit(load_config(base=base), kind="distill")
    assert summary["run_dir"] == f"{s3}/ed-runs/ed-student"
    teachers = summary["config"]["curriculum"]["teachers"]
    assert len(teachers) == 2 and all(t.startswith(f"{s3}/ed-runs/edteacher-resnet8-digits-g") for t in teachers)
    assert [load_model(t).num_classes for t in teachers] == [5, 5]  # local labels, read from the store
    files = storage.list_files(f"{s3}/ed-runs")
    assert {"ed-student/final_model.pt", "ed-student/summary.json"} <= set(files)
    rows = _rows(summary["run_dir"])
    assert [r["grade"] for r in rows] == [1, 2] and rows[1]["group_top1_2"] is not None
