"""cluster.yaml: valid for Ray's own cluster-launcher schema, offline, and holding what kcd_ray relies on."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
GPU_FAMILIES = ("g4dn", "g5", "g6", "p3", "p4d", "p5")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    # Private API (Ray pins <2.61 in pyproject): fills provider defaults, merges setup commands.
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def test_validates_against_rays_schema(prepared):
    assert prepared["provider"]["type"] == "aws"


def test_the_validator_rejects_what_it_should(raw):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    bad["max_wokers"] = 3  # a typo at the top level
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_1x"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def _family(node: dict) -> str:
    return node["node_config"]["InstanceType"].split(".")[0]


def test_cpu_head_and_autoscaling_gpu_workers(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert _family(head) not in GPU_FAMILIES and not head.get("resources", {}).get("GPU")
    assert head["max_workers"] == 0
    gpu = {k: v for k, v in types.items() if k != prepared["head_node_type"] and _family(v) in GPU_FAMILIES}
    assert gpu, "at least one GPU worker type"
    for name, node in gpu.items():
        assert node["min_workers"] == 0 < node["max_workers"] <= prepared["max_workers"], name
    assert sum(n["max_workers"] for n in gpu.values()) >= 2


def test_package_and_shared_storage_on_every_node(prepared):
    mounts = prepared["file_mounts"]
    remote = next(r for r, local in mounts.items() if (ROOT / local).resolve() == ROOT)  # the repository itself
    for cmds in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any(re.search(rf"pip install .*-e {re.escape(remote)}\b", c) for c in cmds)
    for pattern in (".venv", "runs", "data"):
        assert pattern in prepared["rsync_exclude"]
    # One EFS/NFS mount on every host, visible inside the container at the same path.
    init = " ".join(prepared["initialization_commands"])
    m = re.search(r"mount -t nfs4 -o \S+ (\S+):/ (/\S+)", init)
    assert m and m.group(1).endswith(".amazonaws.com"), init
    mount_point = m.group(2)
    assert f"-v {mount_point}:{mount_point}" in prepared["docker"]["run_options"]
    # The ray submit entry script works on that shared storage by default.
    submit = (ROOT / "experiments" / "submit.py").read_text()
    assert f'"{mount_point}/kcd_ray"' in submit


def test_ray_version_matches_the_pin(raw):
    import ray

    image = raw["docker"]["image"]
    assert image.startswith("rayproject/ray:") and ray.__version__ in image
    pin = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and ray.__version__.startswith(pin.group(1).rsplit(".", 1)[0])


def test_every_node_keeps_idle_task_workers_as_a_local_run_does(raw, monkeypatch):
    """The raylet setting kcd_ray's local Ray gets (compat.keep_idle_workers) is on every `ray start` of the
    cluster and in every KubeRay pod, with the same value; an explicit setting in the environment wins."""
    from kcd_ray.ray_layer import compat

    want = f"{compat.IDLE_WORKER_ENV}={compat.IDLE_WORKER_KEEP_MS} ray start"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert starts and all(want in c for c in starts), (key, starts)
    rayjob = [d for d in yaml.safe_load_all((ROOT / "experiments" / "kuberay" / "rayjob.yaml").read_text()) if d]
    spec = next(d for d in rayjob if d.get("kind") == "RayJob")["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [w["template"]["spec"] for w in spec["workerGroupSpecs"]]
    for c in (c for pod in pods for c in pod["containers"]):
        assert {e["name"]: e["value"] for e in c.get("env", [])}.get(compat.IDLE_WORKER_ENV) == \
            str(compat.IDLE_WORKER_KEEP_MS), c["name"]
    env = {}
    compat.keep_idle_workers(env)
    assert env == {compat.IDLE_WORKER_ENV: str(compat.IDLE_WORKER_KEEP_MS)}
    env = {compat.IDLE_WORKER_ENV: "5000"}
    compat.local_ray_env(env)
    assert env == {compat.IDLE_WORKER_ENV: "5000", compat.PREEMPTION_WATCHER_ENV: "0",
                   compat.LOG_SCAN_THRESHOLD_ENV: "0"}
