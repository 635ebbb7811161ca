"""`ray submit`'s entry script on a REAL two-node Ray cluster started with `ray start` on this machine.

The cluster is a head and a worker node (`ray start --head` + `ray start --address=127.0.0.1:<port>`,
2 CPUs each). experiments/submit.py runs as a subprocess attached through RAY_ADDRESS, exactly as
`ray submit` runs it on a head node: (a) a distillation whose 2 Train workers must land on different
nodes (STRICT_SPREAD, fractional CPUs), (b) a 2-trial sweep, (c) on a cluster of its own (3 CPUs per node),
an elastic run that loses the worker node mid-run and gets it back (marked slow). The cluster is always stopped by
killing only the processes it started (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "experiments" / "submit.py"
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    def __init__(self, cpus_per_node: int = 2, object_store_mb: int = 150):
        # Short path: Ray's Unix sockets live under the temp dir (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="kcdc", dir="/tmp"))
        self.temp_dir = self.root / "ray"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus, self.store = cpus_per_node, object_store_mb * 2**20
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(uuid.uuid4().hex + uuid.uuid4().hex)

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        # A private auth token: nodes and drivers of this cluster share it, nothing else does.
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="1", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.token_path),
                   # A lost node is declared dead after ~3 s instead of ~15 s (Ray's GCS health check), and a
                   # worker group that waits for a node not yet declared dead gives up after 30 s, not 60 (a new
                   # node's first workers take 10-20 s to start on 2 cores).
                   RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                   RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30")
        return env

    def _start(self, args: list[str], tag: str) -> None:
        log = self.root / f"{tag}.log"
        self.logs.append(log)
        cmd = [RAY, "start", "--block", f"--num-cpus={self.cpus}", f"--object-store-memory={self.store}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}", *args]
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=self._env(), start_new_session=True))

    def start(self, timeout: float = 120.0) -> "LoopbackCluster":
        try:
            self._start(["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                         '--resources={"head": 1}'], "head")
            self._wait_port(timeout)
            self.add_worker()
            self.wait_nodes(2, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, tag: str = "worker") -> None:
        """Start one more worker node (also: bring a lost node back)."""
        self._start([f"--address={self.address}", "--node-ip-address=127.0.0.1"], tag)

    def kill_node(self, index: int) -> None:
        """Lose node ``index`` (0 = head) as a spot instance is lost: SIGKILL every process of its session."""
        sid = self.procs[index].pid
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.getsid(int(d.name)) == sid:
                        os.kill(int(d.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    continue
        self.procs[index].wait(timeout=30)

    def _wait_port(self, timeout: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"ray head exited early:\n{self.logs[0].read_text()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"ray head did not listen on {self.address} in {timeout}s")

    def run_python(self, code: str, timeout: float = 120.0) -> str:
        """Run code in a fresh interpreter attached to this cluster (the test process never attaches)."""
        env = {**self._env(), "RAY_ADDRESS": self.address}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
        if out.returncode:
            raise RuntimeError(f"attached script failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return out.stdout

    def wait_nodes(self, n: int, timeout: float) -> list[str]:
        code = (
            "import time, ray\n"
            "ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
            f"t0 = time.time()\n"
            f"while time.time() - t0 < {timeout}:\n"
            "    alive = [x['NodeID'] for x in ray.nodes() if x['Alive']]\n"
            f"    if len(alive) >= {n}: break\n"
            "    time.sleep(0.5)\n"
            "print('NODES', ' '.join(alive))\n"
        )
        line = [x for x in self.run_python(code, timeout + 60).splitlines() if x.startswith("NODES")][-1]
        nodes = line.split()[1:]
        if len(nodes) < n:
            raise TimeoutError(f"only {len(nodes)} of {n} Ray nodes came up; logs in {self.root}")
        self.node_ids = nodes
        return nodes

    # ------------------------------------------------------------------ teardown

    def _ours(self) -> list[int]:
        """Live pids in our nodes' sessions, or naming our private temp dir on their command line."""
        for p in self.procs:
            p.poll()  # reap an exited `ray start` (our child): a zombie is not alive, but /proc lists it
        sids = {p.pid for p in self.procs}  # start_new_session: each `ray start` leads its own session
        marker = str(self.root).encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            pid = int(d.name)
            try:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, waiting for its parent to reap it: holds nothing
                if os.getsid(pid) in sids or marker in (d / "cmdline").read_bytes():
                    pids.append(pid)
            except (OSError, ProcessLookupError, IndexError):
                continue
        return pids

    def stop(self, grace: float = 2.0) -> None:
        # SIGTERM, then SIGKILL what is left after `grace` seconds. Measured here: Ray's raylets ignore SIGTERM for
        # ~10 s and its GCS and `ray start --block` not at all, so a longer grace only waits (10 s per cluster).
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            t0 = time.time()
            while time.time() - t0 < wait:
                left = self._ours()
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.leftover = self._ours()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- the tests


@contextlib.contextmanager
def running_cluster(**kw):
    c = LoopbackCluster(**kw).start()
    try:
        yield c
    finally:
        c.stop()
        leftover = c.leftover
        c.cleanup()
        assert not leftover, f"processes of the test cluster still alive: {leftover}"


def work_folder(cluster) -> Path:
    """A shared work folder (the EFS of a real cluster) with a teacher and a digits recipe."""
    from kcd_ray.models import build_model, save_model

    w = cluster.root / "work"
    w.mkdir()
    save_model(w / "teacher.pt", build_model("resnet8", 10))  # untrained: placement and plumbing are under test
    recipe = {"model": "resnet8", "data": {"name": "digits", "image_size": 8, "root": "./data"},
              "optim": {"epochs": 1, "batch_size": 128, "eval_batch_size": 512},
              "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.25,
                          "placement_strategy": "STRICT_SPREAD"},
              "run": {"storage_path": "./runs", "name": "spread", "verbose": 1},
              "distill": {"teacher": "./teacher.pt"},  # relative: resolved in the work folder, not in a worker's
              "kcd": {"interval": 1, "stages": 1}}
    (w / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return w


@pytest.fixture(scope="module")
def cluster():
    with running_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def work(cluster):
    return work_folder(cluster)


def _submit(cluster, work, *args, timeout=420) -> str:
    env = {**cluster._env(), "RAY_ADDRESS": cluster.address}
    out = subprocess.run([sys.executable, str(SUBMIT), *args, "--workdir", str(work)], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    return text


def test_distill_places_two_workers_on_two_nodes(cluster, work):
    """(The teacher-output cache on two nodes: the slow drill with everything in S3.)"""
    text = _submit(cluster, work, "distill", "--config", "recipe.yaml")
    assert "[submit] attached to" in text and "2 nodes" in text
    run = work / "runs" / "spread"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["kcd_enabled"]
    nodes = [(run / "nodes" / f"rank_{r}.txt").read_text().strip() for r in (0, 1)]
    assert nodes[0] != nodes[1], "STRICT_SPREAD put both workers on one node"
    assert set(nodes) == set(cluster.node_ids)


# ~30 s; a sweep through `ray submit` also runs in the S3 drill (slow too), Tune sweeps in test_tune.py
@pytest.mark.slow
def test_sweep_of_two_trials(cluster, work):
    sweep = {"name": "two", "base": "recipe.yaml", "storage_path": "./runs/sweeps",
             # in-process trials: each one runs in its Tune trial actor, on either node
             "overrides": {"scaling.num_workers": 0, "scaling.placement_strategy": "PACK", "optim.epochs": 2},
             "space": {"kcd.rho": [0.5, 0.9]}}
    (work / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    text = _submit(cluster, work, "sweep", "--config", "sweep.yaml")
    assert "sweep two: 2 runs (2 done)" in text, text[-4000:]
    from kcd_ray.report import report

    res = report(work / "runs" / "sweeps" / "two")
    ratios = {r["kcd.rho"]: r["compute_ratio"] for r in res["rows"]}
    n = json.loads(next((work / "runs" / "sweeps" / "two" / "runs").glob("*/summary.json")).read_text())["num_train"]
    for rho, drop in ((0.5, n // 2), (0.9, n // 10)):  # one stage: drop floor(N (1 - rho)), keep >= floor(rho N)
        kept = max(n - drop, math.floor(rho * n))
        # epoch 0 on all N samples, epoch 1 on the kept ones: each trial ran its own config
        assert math.isclose(ratios[rho], (n + kept) / (2 * n), rel_tol=1e-6), res["text"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _kept(run: Path) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(run / "masks" / "mask_final.parquet").to_pydict()
    return {k: t[k] for k in ("sample_id", "kept", "partner_id")}


def _controller_decisions(cluster) -> str:
    """Ray Train's controller INFO lines (resize decisions, failures, worker groups): what a failure message needs."""
    out = []
    for f in (cluster.temp_dir / "session_latest" / "logs" / "train").glob("ray-train-sys-controller-*.log"):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("levelname") in ("INFO", "WARNING", "ERROR"):
                out.append(f"{r['asctime'][11:19]} {r['message'][:160]}".replace("\n", " | "))
    return "\n".join(out[-40:])


@pytest.mark.slow
def test_elastic_run_survives_losing_a_node():
    """Its own cluster (it replaces the worker node; ~2.5 min, hence `slow`: run with `pytest -m slow`). An elastic
    KCD run (2 workers, at least 1; one 2-CPU worker per 3-CPU node, the rest for Ray Data) loses the worker node
    during epoch 2 (SIGKILL of every process of that node), continues on the head from the last checkpoint with 1
    worker, scales back to 2 when the node returns, and finishes: each epoch once in metrics.jsonl, and the final
    kept set (seeded ``random`` values) equal to an uninterrupted run's with 1 worker (no kept row is dropped by the
    equal split, whatever the worker count)."""
    with running_cluster(cpus_per_node=3) as cluster:
        _elastic_drill(cluster, work_folder(cluster))


def _elastic_drill(cluster, work: Path) -> None:
    common = ["kcd.value_fn=random", "kcd.stages=3", "kcd.rho=0.5", "optim.epochs=10", "optim.batch_size=64",
              "scaling.cpus_per_worker=2", "scaling.placement_strategy=PACK"]
    _submit(cluster, work, "distill", "--config", "recipe.yaml", *common, "scaling.num_workers=0", "run.name=steady")
    env = {**cluster._env(), "RAY_ADDRESS": cluster.address}
    elastic = [*common, "scaling.num_workers=2", "scaling.min_workers=1", "scaling.resize_interval_s=2",
               "run.max_failures=4", "run.name=elastic"]
    # The driver of `experiments/submit.py distill`, plus the drill hook "pace": each epoch run on one worker is
    # followed by a 3 s pause, so the lost-node phase outlasts the node's return and the group's growth.
    code = ("import sys; from kcd_ray.config import load_config; from kcd_ray.ray_layer.trainer import fit; "
            f"fit(load_config('recipe.yaml', {elastic!r}), kind='distill', "
            "hooks=[('pace', {'below': 2, 'seconds': 3.0})])")
    log = cluster.root / "elastic_driver.log"
    metrics = work / "runs" / "elastic" / "metrics.jsonl"
    with open(log, "w") as f:
        driver = subprocess.Popen([sys.executable, "-c", code], cwd=str(work), env=env, stdout=f,
                                  stderr=subprocess.STDOUT)
    lost = back = False
    t0 = time.time()
    try:
        while driver.poll() is None and time.time() - t0 < 420:
            rows = _lines(metrics)
            if not lost and len(rows) >= 2:
                cluster.kill_node(1)
                lost = True
            if lost and not back and any(r["world_size"] == 1 for r in rows):
                cluster.add_worker("worker_back")
                back = True
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, log.read_text()[-6000:]
    rows = _lines(metrics)
    assert [r["epoch"] for r in rows] == list(range(10)), [r["epoch"] for r in rows]
    worlds = [r["world_size"] for r in rows]
    # Two workers, then one after the loss (the epoch that was running, and one whose checkpoint Ray Train had not
    # yet registered, run again), then two again once the node is back.
    assert worlds[0] == 2 and 1 in worlds and 2 in worlds[worlds.index(1):], (
        f"{worlds}\n{_controller_decisions(cluster)}")
    assert _kept(work / "runs" / "elastic") == _kept(work / "runs" / "steady")
    steady = _lines(work / "runs" / "steady" / "metrics.jsonl")
    assert [r["lr"] for r in rows] == [r["lr"] for r in steady]  # the schedule did not jump with the world size


@pytest.mark.slow
def test_distill_with_data_runs_and_checkpoints_in_s3_on_two_nodes(cluster, work, s3):
    """`ray submit`'s distill on both nodes with everything in a real S3-compatible server (moto on loopback; the
    nodes have the AWS_* variables, as a cluster's nodes are configured): the data set is prepared into the bucket,
    the two Train workers (one per node) and Ray Data read it and KCD's blend overlays from there, and the run's
    checkpoints, masks, metrics and summary land in the bucket, and the teacher-output cache is built there and read
    by both workers (no teacher forward on the cached views); then a run whose worker dies resumes from its
    checkpoint in the bucket, and a sweep in the bucket is reported from there. ~2 min, hence `slow`."""
    from kcd_ray import storage

    text = _submit(cluster, work, "distill", "--config", "recipe.yaml", f"data.root={s3}/data",
                   f"run.storage_path={s3}/runs", "run.name=s3run", "optim.epochs=2", "kcd.rho=0.6",
                   "distill.cache=exact")
    assert "2 nodes" in text
    run = f"{s3}/runs/s3run"
    # the teacher-output cache: built on the cluster beside the data set in the bucket, read by both workers
    (manifest,) = [f for f in storage.list_files(f"{s3}/data") if f.endswith("/manifest.json") and "teacher_cache" in f]
    assert list(json.loads(storage.read_text(f"{s3}/data/{manifest}"))["units"]) == ["e0000", "e0001"]
    files = storage.list_files(run)
    assert {"summary.json", "metrics.jsonl", "masks/mask_v001.parquet"} <= set(files), files
    assert any(f.startswith("checkpoint_epoch_0001/") for f in files), files
    assert any(f.startswith("blends/") for f in files), files  # the overlay every node's Ray Data tasks read
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["kept_fraction"] < 1.0
    assert rows[0]["teacher_forward_samples"] == 0 and rows[0]["samples_seen"] > 0
    nodes = {storage.read_text(storage.join(run, "nodes", f"rank_{r}.txt")).strip() for r in (0, 1)}
    assert nodes == set(cluster.node_ids), "STRICT_SPREAD: one worker on each node"
    _worker_death_in_s3(cluster, work, s3)
    _sweep_in_s3(cluster, work, s3)


def _worker_death_in_s3(cluster, work: Path, s3: str) -> None:
    """A worker process dies after epoch 0 (a real crash); Ray Train restarts the group, which resumes from the
    checkpoint in the bucket and runs only epoch 1."""
    from kcd_ray import storage

    args = [f"data.root={s3}/data", f"run.storage_path={s3}/runs", "run.name=s3death", "optim.epochs=2",
            "kcd.rho=0.6", "run.max_failures=1"]
    code = ("from kcd_ray.config import load_config; from kcd_ray.ray_layer.trainer import fit; "
            f"fit(load_config('recipe.yaml', {args!r}), kind='distill', "
            "hooks=[('fail', {'epoch': 0, 'mode': 'exit'})])")
    env = {**cluster._env(), "RAY_ADDRESS": cluster.address}
    out = subprocess.run([sys.executable, "-c", code], cwd=str(work), env=env, capture_output=True, text=True,
                         timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert "worker process has died" in text, text[-4000:]  # Ray's word for the crash
    # the restarted rank 0 said where it resumed (worker stdout: the nodes' Ray log files)
    logs = "".join(f.read_text(errors="replace") for f in cluster.temp_dir.glob("session_*/logs/worker-*.out"))
    assert re.search(r"\[kcd_ray\] resumed from \S+ at epoch 1\b", logs), logs[-3000:]
    rows = [json.loads(x) for x in storage.read_text(f"{s3}/runs/s3death/metrics.jsonl").splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # each epoch once, across the death


def _sweep_in_s3(cluster, work: Path, s3: str) -> None:
    """`ray submit`'s sweep with its folder and its trials' runs in the bucket, then `kcd-ray report` on its URI."""
    from kcd_ray import storage
    from kcd_ray.cli import main

    sweep = {"name": "s3two", "base": "recipe.yaml", "storage_path": f"{s3}/sweeps",
             "overrides": {"scaling.num_workers": 0, "scaling.placement_strategy": "PACK", "optim.epochs": 1,
                           "data.root": f"{s3}/data"},
             "space": {"kcd.rho": [0.5, 0.9]}}
    (work / "s3sweep.yaml").write_text(yaml.safe_dump(sweep))
    text = _submit(cluster, work, "sweep", "--config", "s3sweep.yaml")
    assert "sweep s3two: 2 runs (2 done)" in text, text[-4000:]
    assert main(["report", f"{s3}/sweeps/s3two"]) == 0
    rows = storage.read_text(f"{s3}/sweeps/s3two/trials.csv").splitlines()
    assert len(rows) == 3 and {"trials.csv", "pareto.png", "best_config.yaml"} <= set(
        storage.list_files(f"{s3}/sweeps/s3two"))
