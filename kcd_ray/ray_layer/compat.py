"""Every private Ray API kcd_ray touches, in one place, gated on the Ray minor it was checked against.

Ray is pinned to 2.60.x (pyproject.toml). Each helper says which private name it uses and why; when the
pin moves, this module is the only one to re-check. A helper whose private name is gone degrades to the
public behaviour instead of failing the run.
"""

from __future__ import annotations

import contextlib
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
