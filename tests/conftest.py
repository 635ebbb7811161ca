import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# Keep Ray's session files away from other Ray users of the machine, and never attach to a stray cluster.
os.environ.setdefault("RAY_TMPDIR", "/tmp/kcd_ray_tests")
os.environ.pop("RAY_ADDRESS", None)
# Ray Train's controller polls its workers every 2 s: a finished (or failed) run is noticed up to 2 s late, and
# every fit pays that at least once. A quicker poll costs nothing on a local test cluster. The preemption watcher
# (an extra actor process per worker group, watching for node drains) has nothing to watch here. Set before any
# ray.init, so the local clusters, the CLI subprocesses and `ray start` nodes of the tests all inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray keeps at most num_cpus (2) idle worker processes and kills the rest a second after they go idle, so every run
# started ~8 fresh Python workers for its Ray Data tasks (0.25 CPU each), each importing pyarrow, numpy and kcd_ray
# again: measured on 2 cores, a second 2-worker fit took 20 s, 13 s with up to 8 idle workers kept for reuse (as a
# long-lived cluster reuses them). Only the local test clusters' process pool changes, not what a run does.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
# Of kcd_ray's Ray Data patches (ray_layer/compat.py), the tests' local clusters take only the map-function reuse: the
# budget patch starts an execution's tasks together, and short-lived clusters of tiny runs then pay for more worker
# processes (measured: two ED/Tune tests 31 and 24 s with it, 25 and 21 s without). tests/test_ray_compat.py checks
# the budget patch itself; bench/data_ceiling.py measures both.
os.environ.setdefault("KCD_RAY_DATA_PATCHES", "reuse")


# --------------------------------------------------------------------------- a real S3-compatible server
# moto_server (from the test extras) on a free loopback port, started once per session by the tests that need it.
# No S3 call is mocked: pyarrow's S3 client talks HTTP to it. The AWS_* variables are set here, before any local
# Ray starts, so that Ray's worker processes (and the `ray start` nodes of the cluster tests) have them too.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
# The working copies of every process (Ray's too) in one folder of our own, removed with the server.
STAGE = tempfile.mkdtemp(prefix="kcd_ray_stage_test_")
os.environ.update(AWS_ENDPOINT_URL=ENDPOINT, AWS_ACCESS_KEY_ID="kcd-test", AWS_SECRET_ACCESS_KEY="kcd-test",
                  AWS_REGION="us-east-1", KCD_RAY_STAGE=STAGE)
BUCKET = "kcd-test"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto_server on a free loopback port, with an empty bucket; yields ``s3://<bucket>``."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.fail(f"{exe}: moto_server is not installed; the test extras have it (pip install -e '.[test]')")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(PORT)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(ENDPOINT + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto_server did not start on {ENDPOINT}")
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{PORT}", scheme="http", region="us-east-1",
                          access_key="kcd-test", secret_key="kcd-test", allow_bucket_creation=True).create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(STAGE, ignore_errors=True)



@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (about 3 s to start); modules share it."""
    import ray

    from kcd_ray.ray_layer import compat

    if not ray.is_initialized():
        os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
        # kcd_ray's job runtime env (trainer.init_ray's): every worker process applies the Ray Data patches
        ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False,
                 logging_level="WARNING", runtime_env=compat.job_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny nets gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spinning made two
    threads 10-40x slower than one: modules of small-model tests run single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
