"""A real two-node Ray cluster on 127.0.0.1 for tests, that stops only what it started.

Each node is a `ray start --block` in its own session (process group), with a private --temp-dir.
`stop()` signals those process groups, then kills any process left that belongs to one of those
sessions or names the private temp dir on its command line (raylet, GCS, workers): never anything
else, so other Ray instances on the machine (and `ray stop`'s machine-wide sweep) are left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

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
                   RAY_AUTH_TOKEN_PATH=str(self.token_path))
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
            self._start([f"--address={self.address}", "--node-ip-address=127.0.0.1"], "worker")
            self.wait_nodes(2, timeout)
        except BaseException:
            self.stop()
            raise
        return self

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
        sids = {p.pid for p in self.procs}  # start_new_session: each `ray start` leads its own session
        marker = str(self.root).encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            pid = int(d.name)
            try:
                if os.getsid(pid) in sids or marker in (d / "cmdline").read_bytes():
                    pids.append(pid)
            except (OSError, ProcessLookupError):
                continue
        return pids

    def stop(self, grace: float = 10.0) -> None:
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
