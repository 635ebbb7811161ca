"""Every private Ray API kcd_ray touches, in one place, gated on the Ray minor it was checked against.

Ray is pinned to 2.60.x (pyproject.toml). Each helper says which private name it uses and why; when the
pin moves, this module is the only one to re-check. A helper whose private name is gone degrades to the
public behaviour instead of failing the run.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

import ray

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


def local_ray_env(environ=None) -> None:
    """The environment of an embedded local Ray, set before ``ray.init`` starts it: idle task workers kept
    (:func:`keep_idle_workers`) and no preemption watcher (Ray Train 2.60 starts an actor per run that polls the
    GCS for node drains; a one-node local Ray has none to see, and on 2 cores each of Ray's background actors
    costs the training step ~1% of the CPU). Explicit settings in the environment win."""
    env = os.environ if environ is None else environ
    keep_idle_workers(env)
    env.setdefault(PREEMPTION_WATCHER_ENV, "0")
