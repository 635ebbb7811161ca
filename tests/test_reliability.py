"""Reliability: honest and reproducible resumes, one-line errors from inside Ray, Ctrl-C, no leaks, checkpoint
fallback, a self-repairing teacher cache, names kept in their storage folder, fast failures."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kcd_ray.config import ConfigError, load_config
from kcd_ray.engine.resume import ResumeConflict, check_resume

KCD = ["kcd.interval=1", "kcd.stages=2", "kcd.rho=0.5", "kcd.value_fn=random"]


# --------------------------------------------------------------------------- numbers (no Ray)


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("5E-4", 5e-4), (".5", 0.5), ("2", 2.0), ("1.0e-4", 1e-4)])
def test_float_fields_take_every_form_float_reads(text, value):
    cfg = load_config(overrides=[f"optim.lr={text}", f"optim.weight_decay={text}"])
    assert cfg.optim.lr == value and cfg.optim.weight_decay == value


def test_yaml_files_take_exponents_without_a_dot(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  weight_decay: 5e-4\n  lr: 1e-2\ndistill:\n  temperature:\n    values: [1e0, 2]\n")
    cfg = load_config(str(f))
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.lr == 0.01
    assert cfg.distill.temperature.values == [1.0, 2.0]


@pytest.mark.parametrize("text", [".inf", "inf", "-inf", "nan", ".nan", "1e-4x", "true"])
def test_non_finite_or_non_numbers_are_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a (finite )?number"):
        load_config(overrides=[f"optim.lr={text}"])


# --------------------------------------------------------------------------- resume policy (no Ray)


def test_resume_policy_allows_extension_and_refuses_other_changes():
    from kcd_ray.config import to_dict

    old = to_dict(load_config(overrides=["optim.epochs=6", "kcd.rho=0.7"]))
    longer = to_dict(load_config(overrides=["optim.epochs=8", "kcd.rho=0.7", "run.verbose=0", "scaling.num_workers=2"]))
    assert [k for k, _, _ in check_resume(old, longer, "auto", "x")] == ["optim.epochs", "run.verbose",
                                                                         "scaling.num_workers"]
    changed = to_dict(load_config(overrides=["optim.epochs=8", "kcd.rho=0.5"]))
    with pytest.raises(ResumeConflict, match=r"kcd\.rho 0\.7 -> 0\.5.*run\.name=<name>.*run\.resume=force"):
        check_resume(old, changed, "auto", "runs/x/config.yaml")
    assert ("kcd.rho", 0.7, 0.5) in check_resume(old, changed, "force", "x")


def test_a_budgeted_run_resumes_although_its_stored_config_holds_the_resolved_knob():
    """config.yaml stores what selection.budget resolved (kcd.rho 0.307733); re-running the same command has the
    unresolved default (0.7). With the same budget that is no change; a changed budget still is one."""
    from kcd_ray.config import to_dict

    stored = to_dict(load_config(overrides=["selection.strategy=kcd", "selection.budget=0.4", "kcd.rho=0.307733"]))
    again = to_dict(load_config(overrides=["selection.strategy=kcd", "selection.budget=0.4"]))
    keys = ("kcd.rho", "kcd.stages")
    with pytest.raises(ResumeConflict, match=r"kcd\.rho 0\.307733 -> 0\.7"):
        check_resume(stored, again, "auto", "x")  # without the budget's keys: what a resume met before
    assert check_resume(stored, again, "auto", "x", budget_keys=keys) == []
    other = to_dict(load_config(overrides=["selection.strategy=kcd", "selection.budget=0.5"]))
    with pytest.raises(ResumeConflict, match=r"selection\.budget 0\.4 -> 0\.5"):
        check_resume(stored, other, "auto", "x", budget_keys=keys)


# --------------------------------------------------------------------------- runs


def _args(tmp_path, teacher, *extra):
    return ["model=resnet8", "data.name=digits", "data.image_size=8", f"data.root={tmp_path.parent / 'kcd_data'}",
            "optim.batch_size=64", "optim.lr=0.05", "optim.scheduler=cosine", "optim.threads=1",
            "scaling.cpus_per_worker=0.5", "scaling.data_cpus=0.25", f"run.storage_path={tmp_path / 'runs'}",
            "run.verbose=0", f"distill.teacher={teacher}", *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from kcd_ray.models import build_model, save_model

    torch.manual_seed(0)
    f = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_model(f, build_model("resnet8", 10))
    return str(f)


def _weights(run_dir: Path) -> dict:
    from kcd_ray.models import load_model

    return load_model(run_dir / "final_model.pt").state_dict()


def _same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    for key in ("epoch", "train_loss", "top1", "kept_fraction", "samples_seen", "lr"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], rel=1e-6), key


def _cosine_lrs(epochs: int) -> list[float]:
    fresh = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05),
                                                       epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(fresh.get_last_lr()[0])
        fresh.optimizer.step()
        fresh.step()
    return lrs


@pytest.mark.ray
def test_changed_config_stops_extension_is_recorded_and_lr_follows_the_new_schedule(tmp_path, teacher,
                                                                                     one_torch_thread):
    """The resume policy (driver side, before any worker starts) and the extended schedule, on in-process runs; the
    same LR check on a Ray Train worker is in test_one_worker_resume_is_exact_...'s extension."""
    from kcd_ray.ray_layer.trainer import fit

    base = _args(tmp_path, teacher, "run.name=grow", "scaling.num_workers=0", *KCD)
    fit(load_config(overrides=base + ["optim.epochs=2"]), kind="distill")
    run_dir = tmp_path / "runs" / "grow"
    with pytest.raises(ResumeConflict, match=r"kcd\.rho 0\.5 -> 0\.7"):
        fit(load_config(overrides=base + ["optim.epochs=3", "kcd.rho=0.7"]), kind="distill")
    assert "epochs: 2" in (run_dir / "config.yaml").read_text()  # the stored config still tells what ran
    fit(load_config(overrides=base + ["optim.epochs=3"]), kind="distill")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["lr"] == pytest.approx(_cosine_lrs(3)[2])  # the extended run's LR is the 3-epoch schedule's
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]  # the refused attempt changed nothing
    assert history[-1]["changes"] == [{"key": "optim.epochs", "old": 2, "new": 3}]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["optim"]["epochs"] == 3 and summary["config"]["kcd"]["rho"] == 0.5


@pytest.mark.ray
# ~80 s (three Ray Train fits). The default run keeps a Train worker's death and its resume from the checkpoint
# (tests/test_object_storage.py::test_kcd_distill_writes_everything_to_s3_and_resumes_after_a_worker_death) and
# exact resumes in-process (tests/test_train.py::test_resume_ends_with_the_same_kept_set and the engine's tests).
@pytest.mark.slow
def test_one_worker_resume_is_exact_falls_back_from_a_damaged_checkpoint_and_leaks_nothing(tmp_path, teacher,
                                                                                          one_torch_thread):
    """One Ray Train worker, augmentation and KCD. The interrupted run's worker process dies after epoch 0 (a real
    crash; Train restarts it from the checkpoint, run.max_failures=1). It ends with the same final weights and
    per-epoch metrics as the uninterrupted run (data order, augmentation, KCD ties and the torch/numpy generators
    are restored or derived from (seed, epoch)): a resume that is not exact fails it. (A resume by re-running the
    command is exact too: tests/test_train.py::test_resume_ends_with_the_same_kept_set and the in-process resume
    tests; each Ray Train fit costs ~20 s of start-up on 2 cores.) Then a damaged newest checkpoint: extending the
    run falls back to the older one, on the extended schedule, and the run resumes again after that. No resume
    leaves a checkpoint copy in /tmp.

    The uninterrupted reference runs in-process (scaling.num_workers=0, no Train start-up): one worker computes
    the same thing (pipeline.py: one worker iterates the dataset unsplit; order and augmentation do not depend on
    the worker count; rank 0's seeds; optim.threads=1 both; measured: the same weights and rows). Should that
    ever change, run the reference with scaling.num_workers=1 rather than loosen the comparison."""
    from kcd_ray.ray_layer.trainer import fit

    base = _args(tmp_path, teacher, "scaling.num_workers=1", "data.augment=cifar", *KCD)
    leaks = set(glob.glob("/tmp/checkpoint_tmp_*"))
    ref = fit(load_config(overrides=base + ["optim.epochs=3", "run.name=ref", "scaling.num_workers=0"]),
              kind="distill")
    cut = load_config(overrides=base + ["optim.epochs=3", "run.name=cut", "run.max_failures=1"])
    fit(cut, kind="distill", hooks=[("fail", {"epoch": 0, "mode": "exit"})])
    run_dir = tmp_path / "runs" / "cut"
    assert (run_dir / "injected_failure_epoch_0").exists()  # the worker process really died (and was restarted)
    _same_run(Path(ref["run_dir"]), run_dir)
    # damage the newest checkpoint (same size: its manifest cannot tell, only the load fails); extending the run
    # falls back to the older one and says which
    newest = run_dir / "checkpoint_epoch_0002"
    state = bytearray((newest / "state.pt").read_bytes())
    state[:64] = b"\0" * 64
    (newest / "state.pt").write_bytes(bytes(state))
    out = fit(load_config(overrides=base + ["optim.epochs=4", "run.name=cut", "run.max_failures=1"]), kind="distill")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(4)) and out["epochs"] == 4
    assert rows[3]["lr"] == pytest.approx(_cosine_lrs(4)[3])  # on a worker too: the extended schedule's LR
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    # where the resume really started (epoch 2, from checkpoint_epoch_0001), not where the driver expected it
    assert history[-1]["start_epoch"] == 2 and history[-1]["planned_start_epoch"] == 3, history[-1]
    assert "checkpoint_epoch_0001" in history[-1]["fallback"]
    # epoch 2 trained again went to a new folder: Ray Train's snapshot never lists a folder it deleted ...
    assert (run_dir / "checkpoint_epoch_0002.2" / "checkpoint.json").is_file()
    # ... so the run resumes again after the fallback (it failed with CheckpointManagerInitializationError)
    out = fit(load_config(overrides=base + ["optim.epochs=5", "run.name=cut", "run.max_failures=1"]), kind="distill")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(5)) and out["epochs"] == 5
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history[-1]["event"] == "resume" and history[-1]["start_epoch"] == 4 and "fallback" not in history[-1]
    assert set(glob.glob("/tmp/checkpoint_tmp_*")) == leaks  # resumes copy no checkpoint to /tmp


def _interruptible():
    """A child that Ctrl-C reaches: a shell starts a background command (``pytest ... &`` in a script) with SIGINT
    ignored, its children inherit that, and Python then installs no KeyboardInterrupt handler; a terminal's
    foreground process has the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "kcd_ray.cli", "distill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_interruptible, **kw)


@pytest.mark.ray
# 1: the Ray Train path, ~40 s on 2 cores (`pytest -m slow`); 0: the same CLI and error path, the loop in-process
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_worker_side_failure_is_one_line_with_exit_code_2(tmp_path, teacher, workers, request, capfd):
    """The NaN stop raised inside the training loop: one line, exit 2, the traceback in the run folder. The Ray
    Train variant runs the real `kcd-ray` process; the in-process one calls its main() on the session's Ray (the
    same code from argument parsing to exit code, without ~10 s of a second Ray start)."""
    args = _args(tmp_path, teacher, f"scaling.num_workers={workers}", "optim.epochs=2", "optim.lr=1e30",
                 "run.name=nan", "kcd.enabled=false")
    if workers:
        p = _cli(args)
        out, err = p.communicate(timeout=300)
        code = p.returncode
    else:
        from kcd_ray.cli import main

        request.getfixturevalue("ray_session")
        capfd.readouterr()
        code = main(["distill", *args])
        err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("kcd-ray:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "non-finite gradients" in lines[0] and "error.log" in lines[0], err[-3000:]
    # no traceback of the failure itself (Ray's own actors may still log theirs when several Ray instances
    # share this machine, as in a test session: that is about Ray's State API, not about this run)
    assert [x for x in err.splitlines() if "FloatingPointError" in x or "non-finite" in x] == lines
    log = tmp_path / "runs" / "nan" / "error.log"
    assert "FloatingPointError" in log.read_text()
    assert json.loads((tmp_path / "runs" / "nan" / "status.json").read_text())["state"] == "failed"


@pytest.mark.ray
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # 1: ~35 s more, `pytest -m slow`
def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_and_exit_130(tmp_path, teacher, workers):
    p = _cli(_args(tmp_path, teacher, f"scaling.num_workers={workers}", "optim.epochs=30", "run.name=sigint"))
    metrics = tmp_path / "runs" / "sigint" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    assert metrics.exists(), "the run never finished an epoch"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("kcd-ray:")]
    assert len(line) == 1 and "re-run the same command to resume" in line[0] and "checkpoint" in line[0], err[-3000:]


# --------------------------------------------------------------------------- checkpoints: complete or skipped (no Ray)


def test_a_checkpoint_is_complete_only_when_its_manifest_matches_its_files(tmp_path):
    """checkpoint.json is written last (epoch, every file's size): a half-written folder (a crash between
    ray.train.report and its registration, a half-finished upload) is skipped by a listing, never loaded."""
    from kcd_ray.engine.plan import last_checkpoint
    from kcd_ray.engine.plan.prepare import checkpoint_start
    from kcd_ray.engine.rundir import RunDir, checkpoint_dir_name
    from kcd_ray.engine.checkpoint import save_run_checkpoint
    from test_checkpoint import _parts

    def save_epoch(folder, epoch):
        save_run_checkpoint(folder, **_parts(epoch))

    run = RunDir(tmp_path / "run")
    for epoch in (0, 1, 2):
        save_epoch(run.path / f"checkpoint_epoch_{epoch:04d}", epoch)
    assert run.checkpoint_names() == ["checkpoint_epoch_0000", "checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    state = run.path / "checkpoint_epoch_0002" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    (run.path / "checkpoint_epoch_0001" / "checkpoint.json").unlink()  # never completed
    problems = run.checkpoint_problems()
    assert "state.pt has 1000 bytes" in problems["checkpoint_epoch_0002"]
    assert "checkpoint.json" in problems["checkpoint_epoch_0001"] and problems["checkpoint_epoch_0000"] is None
    assert run.checkpoint_names() == ["checkpoint_epoch_0000"]
    # the resume the driver plans: from epoch 0's checkpoint, so training starts at epoch 1 (whatever metrics say)
    ckpt = last_checkpoint(run)
    assert ckpt.endswith("checkpoint_epoch_0000") and checkpoint_start(run, ckpt, fallback=3) == 1
    # an epoch trained again gets a new folder, ordered after the old one and before the next epoch
    taken = set(run.checkpoint_folders())
    assert checkpoint_dir_name(2, taken) == "checkpoint_epoch_0002.2"
    assert checkpoint_dir_name(3, taken) == "checkpoint_epoch_0003"
    save_epoch(run.path / "checkpoint_epoch_0002.2", 2)
    assert run.checkpoint_names() == ["checkpoint_epoch_0000", "checkpoint_epoch_0002.2"]
    run.mark_damaged("checkpoint_epoch_0002.2", "state.pt: not loadable")
    assert run.checkpoint_names() == ["checkpoint_epoch_0000"]
    assert (run.path / "checkpoint_epoch_0002.2").is_dir()  # marked, never deleted: Ray Train's snapshot lists it


# --------------------------------------------------------------------------- refusals before anything runs (no Ray)


def _tiny_base(root: Path) -> dict:
    return {"model": "resnet8",
            "data": {"name": "synthetic", "root": str(root / "data"),
                     "synthetic": {"num_train": 96, "num_test": 40, "num_classes": 4, "image_size": 8}},
            "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05, "scheduler": "cosine", "threads": 1},
            "scaling": {"num_workers": 0, "cpus_per_worker": 0.5, "data_cpus": 0.25},
            "run": {"verbose": 0, "storage_path": str(root / "runs")}, "kcd": {"enabled": False}}


def _tiny_cfg(base: dict, **over):
    import copy

    return load_config(base=copy.deepcopy(base), overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from kcd_ray.models import build_model, save_model

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(1)
    save_model(root / "teacher.pt", build_model("resnet8", 4))
    base = _tiny_base(root)
    base["distill"] = {"teacher": str(root / "teacher.pt")}
    return root, base


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/abs", "~x", "a\\b"])
def test_run_sweep_and_trial_names_stay_in_their_storage_folder(tmp_path, tiny_teacher, name):
    """run.name and a sweep's name (its trials' run names start with it) are one folder name, for a path or a URI."""
    from kcd_ray.engine.plan import plan_run
    from kcd_ray.engine.rundir import run_folder
    from kcd_ray.sweeps.spec import load_sweep

    _, base = tiny_teacher
    cfg = _tiny_cfg(base, **{"run.name": name, "run.storage_path": str(tmp_path / "store" / "runs")})
    with pytest.raises(ConfigError) as e:
        plan_run(cfg, "distill")
    assert str(e.value).startswith(f"run.name: {name!r} is not a valid name") and "\n" not in str(e.value)
    assert not (tmp_path / "store" / "escape").exists() and not (tmp_path / "store" / "runs" / "a").exists()
    with pytest.raises(ConfigError, match=r"^run\.name: "):
        run_folder("s3://bucket/runs", name)  # refused before any request to the store
    with pytest.raises(ConfigError, match=r"^<inline sweep>: name: .* is not a valid name"):
        load_sweep({"name": name, "base": {"data": {"name": "digits"}}, "storage_path": str(tmp_path / "sweeps")})


def test_an_unreachable_mlflow_server_fails_the_plan_in_seconds_naming_the_key(tmp_path, tiny_teacher):
    """A closed loopback port: refused in one line naming run.tracking_uri before the data set is even prepared
    (MLflow's client retried for ~4.5 minutes inside the worker)."""
    import socket

    from kcd_ray.engine.plan import plan_run

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, base = tiny_teacher
    cfg = _tiny_cfg(base, **{"run.trackers": ["mlflow"], "run.tracking_uri": f"http://127.0.0.1:{port}",
                             "data.root": str(tmp_path / "data")})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        plan_run(cfg, "distill")
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert msg.startswith(f"run.tracking_uri: the MLflow server at http://127.0.0.1:{port} does not answer")
    assert "\n" not in msg and not (tmp_path / "data").exists()


def test_an_unwritable_sqlite_tracking_path_names_the_key(tmp_path, tiny_teacher):
    from kcd_ray.engine.plan import plan_run

    (tmp_path / "file").write_text("not a folder")
    _, base = tiny_teacher
    uri = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"
    with pytest.raises(ConfigError) as e:
        plan_run(_tiny_cfg(base, **{"run.trackers": ["mlflow"], "run.tracking_uri": uri}), "distill")
    assert str(e.value).startswith(f"run.tracking_uri: {uri}: cannot make the database's folder")
    assert "is a file" in str(e.value)


def test_ed_group_count_is_refused_before_any_teacher_trains(tmp_path):
    """curriculum.groups=20 on digits' 10 classes: one line at plan time, no group-teacher folder left behind."""
    from kcd_ray.engine.plan import plan_run

    grades = ",".join(["1"] * 20)
    cfg = load_config("experiments/ed/digits.yaml", [
        f"data.root={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}", "run.verbose=0",
        "curriculum.groups=20", f"curriculum.grade_epochs=[{grades}]", "optim.epochs=20"])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        plan_run(cfg, "distill")
    assert str(e.value) == "curriculum.groups: 20 groups for 10 classes; expected 1..10"
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "runs").exists()


def test_a_bad_override_is_blamed_on_the_command_line_not_the_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("experiments/digits/kd.yaml", ["optim.lr=abc"])
    assert str(e.value).startswith("command-line override optim.lr: ") and "kd.yaml" not in str(e.value)
    bad = tmp_path / "kd.yaml"
    bad.write_text("optim:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: optim\.lr: "):  # a bad value in the file: the file
        load_config(str(bad), ["optim.epochs=3"])


def test_ray_start_timeout_names_the_busy_machine_and_retries_once(monkeypatch, capsys):
    """Ray's node start-up timeout on a loaded machine: tried twice, then one `error:` line naming the cause, the
    retry and RAY_raylet_start_wait_time_s (it was `internal error: Exception: ... timed out during startup`)."""
    import ray

    from kcd_ray import cli
    from kcd_ray.ray_layer import compat

    calls = []

    def slow_node(*a, **k):
        calls.append(1)
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", slow_node)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(compat.RayStartError) as e:
        compat.start_local_ray(1)
    assert len(calls) == 2 and "RAY_raylet_start_wait_time_s" in str(e.value) and "busy" in str(e.value)

    def run(args):
        raise e.value

    monkeypatch.setattr(cli, "cmd_distill", run)
    assert cli.main(["distill"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kcd-ray: error: Ray's local node timed out during start-up"), err


# --------------------------------------------------------------------------- the teacher cache repairs itself


@pytest.mark.ray
# ~25 s (three runs and a cache build); the default run checks the manifest's damage detection without a run
# (tests/test_teacher_cache.py::test_manifest_mismatch_and_damaged_shard_are_one_line_errors)
@pytest.mark.slow
def test_a_damaged_teacher_cache_is_found_at_the_start_rebuilt_and_then_serves_every_row(tmp_path, tiny_teacher,
                                                                                        ray_session, capsys):
    """The repair round trip: a truncated shard and a deleted one (what the old advice said to do) are found before
    the next run trains (the plan says so, no Ray), rebuilt (one line each, at run.verbose=0), and the run then
    makes no teacher forward. A same-size corruption whose file time was kept is caught by `cache-teacher`, which
    reads every shard's sha256."""
    import os

    from kcd_ray.cache.store import read_manifest
    from kcd_ray.cli import main
    from kcd_ray.config import dump_yaml
    from kcd_ray.engine.plan import plan_run
    from kcd_ray.ray_layer.trainer import fit

    _, base = tiny_teacher
    cache = tmp_path / "cache"
    over = {"distill.cache": "exact", "distill.cache_dir": str(cache), "run.storage_path": str(tmp_path / "runs")}
    fit(_tiny_cfg(base, **over, **{"run.name": "a"}))
    good = read_manifest(cache)["units"]
    e0, e1 = cache / "e0000.parquet", cache / "e0001.parquet"
    e0.write_bytes(e0.read_bytes()[:1000])
    e1.unlink()
    plan = plan_run(_tiny_cfg(base, **over, **{"run.name": "b"}), "distill")
    assert "damaged, rebuilt first: e0000 (1000 bytes, the manifest says" in plan.cache_note, plan.cache_note
    assert "e0001 (missing shard listed in the manifest)" in plan.cache_note
    capsys.readouterr()
    summary = fit(_tiny_cfg(base, **over, **{"run.name": "b"}))
    out = capsys.readouterr().out
    assert [x for x in out.splitlines() if "rebuilding it" in x] == [
        f"[kcd_ray] teacher cache: unit e0000 ({e0}): 1000 bytes, the manifest says {good['e0000']['bytes']} "
        "(truncated or rewritten); rebuilding it",
        f"[kcd_ray] teacher cache: unit e0001 ({e1}): missing shard listed in the manifest; rebuilding it"], out
    m = read_manifest(cache)
    assert m["builds"][-1]["units"] == ["e0000", "e0001"] and m["units"] == good  # the same shards again
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["teacher_forward_samples"] for r in rows] == [0, 0]
    # same size, same file time: only a full read finds it; `kcd-ray cache-teacher` does that read
    st = e1.stat()
    data = bytearray(e1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    e1.write_bytes(bytes(data))
    os.utime(e1, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "damaged" not in plan_run(_tiny_cfg(base, **over, **{"run.name": "c"}), "distill").cache_note
    f = tmp_path / "kd.yaml"
    f.write_text(dump_yaml(_tiny_cfg(base, **over)))
    capsys.readouterr()
    assert main(["cache-teacher", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"unit e0001 ({e1}): sha256 differs from the manifest (damaged); rebuilding it" in out, out
    assert read_manifest(cache)["units"] == good


@pytest.mark.ray
def test_a_cache_the_method_cannot_use_is_said_at_every_verbosity_and_recorded(tmp_path, tiny_teacher, ray_session,
                                                                               capsys):
    from kcd_ray.ray_layer.trainer import fit

    _, base = tiny_teacher
    summary = fit(_tiny_cfg(base, **{"distill.method": "fitnet", "distill.cache": "exact", "optim.epochs": 1,
                                     "run.name": "fitnet", "run.storage_path": str(tmp_path / "runs")}))
    lines = [x for x in capsys.readouterr().out.splitlines() if "distill.cache=exact not used" in x]
    assert len(lines) == 1 and "feature maps" in lines[0] and "the teacher stays in the loop" in lines[0]
    stored = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert stored["teacher_in_loop"] is True and "feature maps" in stored["teacher_note"]


# --------------------------------------------------------------------------- a forced resume tells the truth


@pytest.mark.ray
def test_a_forced_change_to_a_finished_run_is_refused_and_one_that_trains_is_recorded(tmp_path, tiny_teacher,
                                                                                    ray_session, capsys):
    """run.resume=force with a changed training key: on a finished run it would train nothing and relabel the
    results, so it is refused naming run.resume=never; with more epochs the new epochs train under the new key,
    and history.jsonl and summary.json say which epochs trained under which. The resume's start epoch comes from
    the checkpoint, so a deleted metrics.jsonl does not make it 0."""
    from kcd_ray.ray_layer.trainer import fit

    _, base = tiny_teacher
    kcd = {"kcd.enabled": True, "kcd.interval": 1, "kcd.stages": 2, "kcd.value_fn": "random",
           "run.name": "r1", "run.storage_path": str(tmp_path / "runs")}
    fit(_tiny_cfg(base, **kcd, **{"kcd.rho": 0.7}))
    run_dir = tmp_path / "runs" / "r1"
    files = {f: (run_dir / f).read_bytes() for f in ("config.yaml", "summary.json", "metrics.jsonl", "history.jsonl")}
    with pytest.raises(ConfigError) as e:
        fit(_tiny_cfg(base, **kcd, **{"kcd.rho": 0.5, "run.resume": "force"}))
    msg = str(e.value)
    assert msg.startswith("run.resume=force: run 'r1' has trained all 2 epochs") and "kcd.rho 0.7 -> 0.5" in msg
    assert "run.resume=never" in msg and "\n" not in msg
    assert {f: (run_dir / f).read_bytes() for f in files} == files  # nothing relabelled
    (run_dir / "metrics.jsonl").unlink()
    capsys.readouterr()
    summary = fit(_tiny_cfg(base, **kcd, **{"kcd.rho": 0.5, "run.resume": "force", "optim.epochs": 3}))
    assert "epochs 3-3 train under the changed kcd.rho 0.7 -> 0.5" in capsys.readouterr().out
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [(h["event"], h["start_epoch"]) for h in history] == [("start", 0), ("resume", 2)]
    assert {"key": "kcd.rho", "old": 0.7, "new": 0.5} in history[-1]["changes"]
    stored = json.loads((run_dir / "summary.json").read_text())
    assert stored["trained_under"] == [{"epochs": [0, 2], "changes": []},
                                       {"epochs": [2, 3], "changes": history[-1]["changes"]}]
    assert stored["config"]["kcd"]["rho"] == 0.5 == summary["config"]["kcd"]["rho"]  # the last epochs' config
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


# --------------------------------------------------------------------------- Ctrl-C on a sweep


@pytest.mark.ray
@pytest.mark.slow  # ~35 s: a second `kcd-ray` process with its own Ray; Ctrl-C on `distill` is in the default run
def test_ctrl_c_on_a_sweep_exits_130_marks_the_trial_and_writes_no_report(tmp_path, tiny_teacher):
    import yaml

    _, base = tiny_teacher
    sweep = {"name": "cc", "storage_path": str(tmp_path / "sweeps"),
             "base": {**base, "optim": {**base["optim"], "epochs": 40}, "data": {**base["data"], "val_fraction": 0.25}},
             "space": {"optim.lr": [0.05]}}
    f = tmp_path / "cc.yaml"
    f.write_text(yaml.safe_dump(sweep))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "kcd_ray.cli", "sweep", "--config", str(f)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_interruptible)
    runs = tmp_path / "sweeps" / "cc" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and \
            not any(m.read_text().strip() for m in runs.glob("*/metrics.jsonl")):
        time.sleep(0.5)
    assert p.poll() is None and list(runs.glob("*/metrics.jsonl")), (
        f"the trial never finished an epoch: {p.stderr.read() if p.poll() is not None else ''}")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 130, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("kcd-ray:")]
    assert len(lines) == 1 and "sweep cc interrupted" in lines[0], err[-3000:]
    assert f"re-run `kcd-ray sweep --config {f}` to resume" in lines[0] and "no report written" in lines[0]
    (status,) = [json.loads(s.read_text()) for s in runs.glob("*/status.json")]
    assert status["state"] == "interrupted"
    folder = tmp_path / "sweeps" / "cc"
    assert not (folder / "best_config.yaml").exists() and not (folder / "trials.csv").exists()
