"""Every private Ray API kcd_ray touches, in one place, gated on the Ray minor it was checked against.

Ray is pinned to 2.60.x (pyproject.toml). Each helper says which private name it uses and why; when the
pin moves, this module is the only one to re-check. A helper whose private name is gone degrades to the
public behaviour instead of failing the run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from typing import Iterator, Optional

import ray

from kcd_ray.errors import EnvironmentProblem

CHECKED_MINOR = (2, 60)
RAY_MINOR = tuple(int(p) for p in ray.__version__.split(".")[:2])
CHECKED = RAY_MINOR == CHECKED_MINOR


@contextlib.contextmanager
def parquet_reader_v1(ctx) -> Iterator[None]:
    """Build a ``read_parquet`` plan with the V1 datasource.

    Private: ``DataContext.use_datasource_v2`` (2.60). Its ListFiles -> ReadFiles path costs seconds per
    execution, i.e. per epoch, on small machines; the V1 reader takes ~0.2 s for the same files.
    """
    had = hasattr(ctx, "use_datasource_v2")
    old = getattr(ctx, "use_datasource_v2", False)
    if had:
        ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        if had:
            ctx.use_datasource_v2 = old


def skip_driver_log_lines(pattern: "re.Pattern[str]") -> bool:
    """Drop forwarded worker lines matching ``pattern`` from the driver's echo (they stay in the log files).

    Private: ``ray._private.ray_logging.{stdout,stderr}_deduplicator.skip_re`` (2.60), the object behind
    the public ``RAY_DEDUP_LOGS_SKIP_REGEX``; a user's own regex (already set) wins. Returns whether it applied.
    """
    try:
        from ray._private import ray_logging
    except ImportError:  # pragma: no cover - a Ray without the module: keep Ray's output as it is
        return False
    applied = False
    for d in (getattr(ray_logging, "stdout_deduplicator", None), getattr(ray_logging, "stderr_deduplicator", None)):
        if d is not None and getattr(d, "skip_re", "absent") is None:
            d.skip_re = pattern
            applied = True
    return applied


def pull_based_sort(ctx) -> bool:
    """Plan ``Dataset.sort`` of datasets built on ``ctx`` with Ray's pull-based sort shuffle.

    DeveloperAPI (alpha, pinned): ``DataContext.shuffle_strategy`` and ``ShuffleStrategy.SORT_SHUFFLE_PULL_BASED``
    (2.60). 2.60's default, SHUFFLE_V2, runs its sort map and reduce tasks under their own ``runtime_env``
    (an env var), i.e. in dedicated worker processes that Ray starts on demand and reaps when idle: re-executed
    every epoch, a 2048-row sort took 1-8 s per epoch on 2 cores, against 0.1-0.3 s pull-based
    (kcd_ray.ray_layer.pipeline, "Shuffling"). Returns whether it applied (False: Ray default kept).
    """
    try:
        from ray.data.context import ShuffleStrategy

        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    except (ImportError, AttributeError, ValueError):  # pragma: no cover - a Ray without the strategy
        return False
    return True


def keep_default_sigint(trainer) -> None:
    """Ctrl-C during ``trainer.fit()`` raises KeyboardInterrupt in the driver, as in-process runs do.

    Private: ``DataParallelTrainer._register_sigint_handler`` (Train V2, 2.60) installs a handler that aborts the
    controller and then ``sys.exit``s with no message (exit code 1 in practice). kcd_ray's driver turns the
    KeyboardInterrupt into one line naming the last checkpoint and exit code 130; the job's actors and workers
    end with the driver (none is detached), and every reported checkpoint is already in storage.
    """
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None


IDLE_WORKER_KEEP_MS = 60_000
IDLE_WORKER_ENV = "RAY_idle_worker_killing_time_threshold_ms"


def keep_idle_workers(environ=None) -> None:
    """Let an idle task worker process live ``IDLE_WORKER_KEEP_MS`` before the raylet kills it (Ray's default:
    1 s, once the node has more worker processes than CPUs, which Train's and Data's actors always make it have).

    Private: the raylet setting ``idle_worker_killing_time_threshold_ms`` (2.60), read from the environment of
    the process that starts the raylet: ``ray.init`` of a local Ray here, ``ray start`` on a cluster
    (cluster.yaml sets it there). Why: Ray Data's map tasks go idle whenever the consumer (a training step, an
    eval, the E-step) holds them back for a second; the raylet then kills their processes and the next tasks
    wait for new ones, each importing torch again (~4 s of a core on 2 cores). Measured (bench/data_ceiling.py,
    50k CIFAR rows, 8 epochs): 2 of 7 steady epochs stalled 3-5 s with the default, none with 60 s. An explicit
    setting in the environment wins."""
    env = os.environ if environ is None else environ
    env.setdefault(IDLE_WORKER_ENV, str(IDLE_WORKER_KEEP_MS))


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray 2.60's log monitor re-lists the session's log folder on every 0.1 s pass while it has fewer files than this
# threshold, and every LOG_NAME_UPDATE_INTERVAL_S (0.5 s) past it; log lines are still read every pass.
LOG_SCAN_THRESHOLD_ENV = "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"


def local_ray_env(environ=None) -> None:
    """The environment of an embedded local Ray, set before ``ray.init`` starts it: idle task workers kept
    (:func:`keep_idle_workers`), no preemption watcher (Ray Train 2.60 starts an actor per run that polls the
    GCS for node drains; a one-node local Ray has none to see) and the log monitor listing its folder for new
    files every 0.5 s instead of ten times a second (idle Ray, 30 s: 0.56 -> 0.26 CPU-s per minute). On 2
    cores each resident Ray process costs the training step ~1% of the CPU. Explicit settings in the
    environment win."""
    env = os.environ if environ is None else environ
    keep_idle_workers(env)
    env.setdefault(PREEMPTION_WATCHER_ENV, "0")
    env.setdefault(LOG_SCAN_THRESHOLD_ENV, "0")


FIRST_RESERVATION_WAIT_S = 0.2
DATA_PATCHES_ENV = "KCD_RAY_DATA_PATCHES"
SETUP_HOOK = "kcd_ray.ray_layer.compat.worker_setup"
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # the job config Ray's job manager hands a submitted driver


def _wrap_once(owner, name: str, wrap) -> bool:
    """Replace ``owner.name`` by ``wrap(original)`` unless already done; False when ``owner`` has no ``name``."""
    original = getattr(owner, name, None)
    if original is None:  # pragma: no cover - a Ray without the name keeps its behaviour
        return False
    if not getattr(original, "_kcd_patched", False):
        wrapper = functools.wraps(original)(wrap(original))
        wrapper._kcd_patched = True
        setattr(owner, name, wrapper)
    return True


def prompt_data_budget() -> bool:
    """Give each Ray Data execution its resource budget from its start instead of a second later.

    Private: ``DefaultAutoscalingCoordinator.get_reserved_resources`` and its ``_pending_reserved_resources``
    (``ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator``, 2.60). Ray Data 2.60 sizes an
    execution's budget from the resources its autoscaling coordinator actor reserved to it, read without blocking
    (the first read answers an empty cache and sends the RPC) and re-read once a second. So every execution starts
    with a zero budget and runs its tasks one at a time (the executor's liveness rule) for its first second; Ray
    Data re-executes the training plan every epoch, so every epoch starts that way, and an epoch shorter than a
    second runs serially throughout. Patched: the first read of each execution waits up to
    ``FIRST_RESERVATION_WAIT_S`` for that RPC (one actor round trip, on the executor's scheduling thread).
    Idempotent; returns whether the patch is in place (False: a Ray without these names keeps its behaviour).
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            DefaultAutoscalingCoordinator as Client,
        )
    except ImportError:  # pragma: no cover - a Ray without the coordinator
        return False

    def wrap(read):
        def get_reserved_resources(self, *args, **kwargs):
            out = read(self, *args, **kwargs)
            pending = getattr(self, "_pending_reserved_resources", None)
            if out or pending is None or self.__dict__.get("_kcd_waited"):
                return out
            self.__dict__["_kcd_waited"] = True  # once per client: each execution has its own
            ray.wait([pending], timeout=FIRST_RESERVATION_WAIT_S)
            return read(self, *args, **kwargs)
        return get_reserved_resources

    return _wrap_once(Client, "get_reserved_resources", wrap)


def reuse_map_task_function() -> bool:
    """Submit every execution's map tasks through one Ray remote function instead of a new one per execution.

    Private: ``ray.data._internal.execution.operators.task_pool_map_operator.cached_remote_fn`` (2.60). A task-pool
    map operator builds its remote function with its own operator id among the static options (``_labels``), so
    each execution (each epoch) defines and exports a new function to the GCS (~25 ms of the scheduling thread
    here) and every worker process imports it again before its first task of the epoch. The operator sets the same
    label on every task it submits (``_get_dynamic_ray_remote_args``), so the static copy is dropped from the key:
    tasks keep their label. Idempotent; returns whether the patch is in place.
    """
    try:
        from ray.data._internal.execution.operators import task_pool_map_operator as pool
    except ImportError:  # pragma: no cover
        return False

    def wrap(make):
        def cached_remote_fn(fn, **static_args):
            static_args.pop("_labels", None)
            return make(fn, **static_args)
        return cached_remote_fn

    return _wrap_once(pool, "cached_remote_fn", wrap)


def quick_data_executions() -> bool:
    """Both Ray Data patches above: an epoch's execution starts with its budget and reuses the map function.
    Measured (2 cores, bench/data_ceiling.py, 8,192 uint8 CIFAR rows: an epoch is two chunk tasks; BENCHMARKS.md):
    the two tasks ran one after the other before and together after. ``KCD_RAY_DATA_PATCHES`` in the environment
    (of the driver before a local Ray starts; of every node on a cluster): ``0`` keeps Ray's behaviour, ``reuse``
    only :func:`reuse_map_task_function` (the test session's: short-lived local clusters of tiny runs pay for the
    extra worker processes a parallel start needs; two such tests timed alone took 31/24 s with both, 25/21 s
    without). Returns whether every selected patch applies."""
    choice = os.environ.get(DATA_PATCHES_ENV, "1")
    if choice == "0":
        return False
    if choice == "reuse":
        return reuse_map_task_function()
    return prompt_data_budget() & reuse_map_task_function()


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook`` for kcd_ray's jobs (:func:`job_runtime_env`): every worker process
    (Train workers, Tune trials, the SplitCoordinator actor: whoever runs a Ray Data execution) applies
    :func:`quick_data_executions` before its first task."""
    quick_data_executions()


def job_runtime_env() -> Optional[dict]:
    """The ``runtime_env`` for ``ray.init`` of a kcd_ray driver (local Ray or attached to a cluster):
    :func:`worker_setup` as the job's worker setup hook; None where the job was submitted (``ray job submit``) with a
    hook of its own, which wins (Ray refuses two). Also patches the calling process: the driver runs eval and
    scoring executions itself."""
    quick_data_executions()
    submitted = json.loads(os.environ.get(JOB_CONFIG_ENV, "") or "{}").get("runtime_env") or {}
    if "worker_process_setup_hook" in submitted:
        return None
    return {"worker_process_setup_hook": SETUP_HOOK}


def start_local_ray(num_cpus=None, **init_kwargs):
    """Start an embedded local Ray as kcd_ray's drivers do (``trainer.init_ray``, the bench scripts): its
    environment (:func:`local_ray_env`), no dashboard, warnings only, kcd_ray's job runtime env. ``address="local"``
    never attaches to a stray cluster someone else left running (docs/methods/ray.md). Returns ``ray.init``'s
    context."""
    local_ray_env()  # before the raylet starts: it and Ray Train read these from this environment
    for attempt in (1, 2):
        try:
            return ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                            runtime_env=job_runtime_env(), **init_kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for it (ray/_private/node.py)
            if NODE_START_TIMEOUT not in str(e):
                raise
            ray.shutdown()  # the half-started node's processes
            if attempt == 2:
                raise RayStartError(RAY_START_ADVICE) from None
            print("[kcd_ray] Ray's local node did not start in time (a busy machine?); starting it once more",
                  flush=True)


# Ray waits 30 s for a new node to register (ray/_private/node.py, fixed), its processes wait for the raylet
# RAY_raylet_start_wait_time_s; on a machine whose CPUs are taken (other jobs, a test suite) that runs out.
NODE_START_TIMEOUT = "timed out during startup"
RAY_START_ADVICE = ("Ray's local node timed out during start-up twice: the machine is busy (other processes hold "
                    "its CPUs); re-run the same command when the load drops (a run resumes where it stopped), or "
                    "give Ray's processes longer with RAY_raylet_start_wait_time_s=<seconds>")


class RayStartError(EnvironmentProblem):
    """Ray could not start on this machine: not the input, not a bug (one line, exit 1)."""
