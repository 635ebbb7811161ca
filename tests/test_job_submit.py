"""`ray job submit` (the Jobs API) against a REAL Ray head started with `ray start --head` on loopback, and the
KubeRay RayJob manifest for the same entry point.

The head runs the dashboard (the Jobs API server; `ray[default]`, in the `jobs` extra). The job uploads this
checkout as its working directory and runs `kcd-ray distill --config experiments/digits/kcd.yaml ...` there: the
recipe is found relative to the uploaded folder, the run goes to a shared folder given by absolute path (a
cluster's shared storage). `kcd-ray` is on the nodes' PATH as on a cluster whose image or runtime env installed
kcd_ray. The cluster is stopped by killing only the processes this test started (LoopbackCluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_submit_cluster import RAY, LoopbackCluster, free_port

ROOT = Path(__file__).resolve().parent.parent
RAYJOB = ROOT / "experiments" / "kuberay" / "rayjob.yaml"
BIN = str(Path(sys.executable).parent)


class DashboardHead(LoopbackCluster):
    """One head node with the dashboard on 127.0.0.1:<dashboard_port>."""

    def __init__(self):
        super().__init__(cpus_per_node=2)
        self.dashboard_port = free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def _env(self) -> dict:
        env = super()._env()
        env["PATH"] = BIN + os.pathsep + env.get("PATH", "")  # the nodes' environment has kcd-ray installed
        return env

    def start(self, timeout: float = 120.0) -> "DashboardHead":
        try:
            self._start(["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"], "head")
            self._wait_port(timeout)
            self._wait_jobs_api(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_jobs_api(self, timeout: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                urllib.request.urlopen(self.dashboard + "/api/version", timeout=5)
                return
            except urllib.error.HTTPError:  # it answers (an auth error is an answer): the server is up
                return
            except OSError:
                time.sleep(1.0)
        raise TimeoutError(f"the dashboard did not answer at {self.dashboard} in {timeout}s; logs in {self.root}")


@pytest.fixture(scope="module")
def head():
    c = DashboardHead().start()
    try:
        yield c
    finally:
        c.stop()
        leftover = c.leftover
        c.cleanup()
        assert not leftover, f"processes of the test cluster still alive: {leftover}"


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_ray_job_submit_runs_kcd_ray_distill(head):
    from kcd_ray.models import build_model, save_model

    shared = head.root / "shared"  # the cluster's shared storage: data, teacher, runs
    shared.mkdir()
    save_model(shared / "teacher.pt", build_model("resnet20", 10))  # untrained: the plumbing is under test
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "KCD_RAY_JOB_TEST": "1"}, "excludes": ["bench/", "docs/"]}
    entrypoint = ["kcd-ray", "distill", "--config", "experiments/digits/kcd.yaml",
                  f"data.root={shared / 'data'}", f"distill.teacher={shared / 'teacher.pt'}",
                  f"run.storage_path={shared / 'runs'}", "run.name=job", "optim.epochs=1", "optim.threads=1",
                  "optim.batch_size=128", "data.image_size=8", "scaling.num_workers=0", "scaling.cpus_per_worker=0.5",
                  "run.trackers=[tensorboard,mlflow]"]
    cmd = [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    out = subprocess.run(cmd, cwd=str(head.root), env=head._env(), capture_output=True, text=True, timeout=420)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert "succeeded" in text, text[-4000:]
    assert "[kcd_ray] distill run job" in text, text[-4000:]  # the job's own output, streamed back
    run = shared / "runs" / "job"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["kcd_enabled"]
    # the recipe came from the uploaded working directory: the job's config is the repository's recipe
    assert yaml.safe_load((run / "config.yaml").read_text())["kcd"]["interval"] == 3
    assert (run / "final_model.pt").is_file() and (run / "mlflow.db").is_file() and (run / "tensorboard").is_dir()
    status = subprocess.run([RAY, "job", "list", "--address", head.dashboard], env=head._env(),
                            capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in status.stdout + status.stderr


# --------------------------------------------------------------------------- the KubeRay manifest


def test_kuberay_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    job = next(d for d in docs if d.get("kind") == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("kcd-ray distill --config ")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] and any("tracking" in p for p in env["pip"])
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60")
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["template"]["spec"]["containers"] for w in workers)
    # shared storage for data, teachers and runs: one ReadWriteMany claim mounted at the same path on every pod
    claim = next(d for d in docs if d.get("kind") == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in [head] + [w["template"]["spec"] for w in workers]:
        vols = {v["name"]: v for v in pod["volumes"]}
        shared = [n for n, v in vols.items()
                  if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        assert shared, "every pod mounts the shared claim"
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts[shared[0]] == "/mnt/kcd_ray"
    assert "run.storage_path=/mnt/kcd_ray/" in spec["entrypoint"]
    # the entry point's config keys exist (a typo would fail only on the cluster)
    from kcd_ray.config import load_config

    args = spec["entrypoint"].split()
    overrides = [a.strip("'\"") for a in args[4:] if "=" in a]
    load_config(ROOT / args[3], overrides)
