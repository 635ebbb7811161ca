"""Ray's own log output, quieted once: the driver's echo of worker lines, and Ray Data/Train loggers.

A run prints kcd_ray's epoch lines and errors; Ray's per-run chatter stays in the session log files.
"""

from __future__ import annotations

import logging
import re

from kcd_ray.ray_layer import compat

# Lines Ray's own actors print on every run that say nothing about this run; forwarded worker lines matching
# them are not echoed to the driver (they stay in the session's log files).
RAY_NOISE = (
    # Ray Data's DatasetManager passes a deprecated option internally (Ray 2.60); nothing for a user to change.
    r"ExecutionOptions\.exclude_resources|self\.exclude_resources = exclude_resources",
    # Ray Train's own PreemptionWatcher / our Ray Data actors: a generic note about actor restarts (ray#53727).
    r"has constructor arguments in the object store and max_restarts > 0",
    # kcd_ray turns Ray Data's progress bars off on purpose (one epoch line instead).
    r"Progress bars disabled\. To enable",
    # streaming_split's coordinator actor announces every epoch's execution; the epoch line already has the time.
    r"Dataset \S+ execution finished in",
)
# Train V2's PlacementGroupCleaner polls the State API, which needs ray[default]'s dashboard. Without it the
# actor logs this every second or so for the whole run, and its check can never succeed anyway.
STATE_API_NOISE = r"Failed to query Ray Train Controller actor state"


def skip_known_ray_noise(state_api_missing: bool) -> None:
    """On the driver, after ``ray.init``: stop echoing the lines above."""
    pattern = re.compile("|".join(RAY_NOISE + ((STATE_API_NOISE,) if state_api_missing else ())))
    compat.skip_driver_log_lines(pattern)


def quiet_ray_data_and_train() -> None:
    """In any process (driver or Train worker): Ray Data's per-execution banners and progress lines, and
    Ray Train's per-report lines, drown the epoch lines: keep warnings only."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Child loggers may carry their own level (set by Ray's dictConfig), so quiet each one, not just the parents.
    # (Some of Ray's modules name their logger by file path, e.g. the one that logs every report.)
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("ray.data", "ray.train", "ray.tune")) or "/ray/train/" in n or "/ray/data/" in n]
    for name in ["ray.data", "ray.train", "ray.tune", *names]:
        logging.getLogger(name).setLevel(logging.WARNING)


# Train V2 logs a failing worker's traceback itself (ray.train.v2._internal.util, "Error in training function"),
# which reaches the driver as ~30 lines before the error does. kcd_ray's driver writes that whole chain to the
# run folder's error.log and prints one line, so the worker's own echo is silenced.
WORKER_ERROR_ECHO = "ray.train.v2._internal.util"


def quiet_worker_error_echo() -> None:
    """In a Train worker: the traceback goes to error.log via the driver, not to the console twice."""
    logging.getLogger(WORKER_ERROR_ECHO).setLevel(logging.CRITICAL)
