"""kcd_ray's errors: ``ConfigError`` for bad input, and errors from inside Ray (or not) made one line: the root
cause, and the traceback in a file.

A Train worker's exception reaches the driver wrapped (``WorkerGroupError`` -> per-rank failures ->
``RayTaskError`` -> ...), and printed whole it is 30-170 lines. :func:`root_cause` digs out the exception the
user's code raised; :func:`as_run_error` writes the whole chain to ``<run folder>/error.log`` and returns the
root exception itself (same type, so callers and tests can catch ``CheckpointError``, ``FloatingPointError``,
...) with the log's path attached as ``kcd_log``. The CLI prints ``kcd-ray: error: <message> (traceback:
<log>)`` and exits 2 for these, whatever the mode.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Optional

class ConfigError(ValueError):
    """A bad configuration value (or a combination of values); the message names the dotted key."""


class EnvironmentProblem(RuntimeError):
    """The machine or cluster, not the input and not a bug (Ray that cannot start on a busy machine): the CLI
    prints it as one ``error:`` line, with what to do, and exits 1."""


# Exceptions that describe a problem with the user's input or files (exit code 2 in the CLI), as opposed to a
# bug (exit code 1). ArrowInvalid is a ValueError; a corrupt Parquet page is an OSError.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FloatingPointError, OSError)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception raised by kcd_ray's or the user's code, out of Ray's wrappers."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if failures:  # Train V2 WorkerGroupError: rank -> exception; the lowest rank's is representative
            exc = failures[min(failures)]
            continue
        if getattr(exc, "controller_failure", None) is not None:
            exc = exc.controller_failure
            continue
        cause = getattr(exc, "cause", None)  # RayTaskError / RayActorError carry the original as .cause
        if isinstance(cause, BaseException):
            exc = cause
            continue
        if _is_ray_wrapper(exc) and exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    return exc


def _is_ray_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("ray.")


def write_error_log(run_dir: Optional[Path], exc: BaseException) -> Optional[Path]:
    """The full chain (Ray's text included) into ``<run_dir>/error.log``; None when there is no run folder."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "error.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path


def as_run_error(exc: BaseException, run_dir: Optional[Path]) -> BaseException:
    """The root exception, with ``kcd_log`` (the traceback file) attached; raise it ``from None``."""
    log = write_error_log(run_dir, exc)
    root = root_cause(exc)
    try:
        root.kcd_log = log
    except AttributeError:  # pragma: no cover - an exception type with __slots__
        pass
    return root


def one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = " ".join(str(msg).split()) or type(exc).__name__
    if not isinstance(exc, (*USER_ERRORS, EnvironmentProblem)) or type(exc) in (OSError,):
        text = f"{type(exc).__name__}: {text}"
    log = getattr(exc, "kcd_log", None)
    return f"{text} (traceback: {log})" if log else text
