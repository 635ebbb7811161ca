"""Resuming a run name with a (possibly) changed config: what may change, what may not, and the record of it.

A run folder's ``config.yaml`` is the config that run trained with. Re-running the same name compares the
new config with it, key by dotted key:

- keys in ``RESUMABLE`` (extending ``optim.epochs``, verbosity, resources, failures, trackers) are applied
  and recorded in ``history.jsonl`` (one JSON line per start or resume);
- any other difference stops the run with one line listing the keys, unless ``run.resume=force``
  (apply them anyway, recorded) or ``run.resume=never`` (start afresh: the old folder is moved aside).

``config.yaml`` is rewritten only when a start or resume is accepted, so it always tells what is running.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kcd_ray.engine.rundir import RunDir

# Keys that may differ on resume: they change how or where a run executes, or extend it, not what it trains.
RESUMABLE_PREFIXES = ("run.", "scaling.")
RESUMABLE = frozenset({"optim.epochs", "optim.threads", "optim.eval_every", "optim.eval_batch_size"})
NEVER_COMPARED = frozenset({"run.name", "run.resume"})


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.endswith(".options"):  # distill.options is one value (free-form)
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every dotted key whose value differs."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in NEVER_COMPARED and a.get(k) != b.get(k)]


def resumable(key: str) -> bool:
    return key in RESUMABLE or key.startswith(RESUMABLE_PREFIXES)


class ResumeConflict(ValueError):
    """A re-run's config differs from the stored one in keys that change what the run trains."""


def check_resume(old: dict, new: dict, policy: str, where: str,
                 budget_keys: tuple = ()) -> list[tuple[str, Any, Any]]:
    """The accepted changes; raises ``ResumeConflict`` (one line) for a change that needs ``run.resume=force``.
    ``budget_keys``: the keys ``selection.budget`` sets (``kcd.rho``, ...). The stored config holds the values the
    budget resolved to and a re-run's config the values before it; with the same budget they are not a change
    (the plan resolves them again, to the same values)."""
    changes = config_diff(old, new)
    budget = flatten(old).get("selection.budget")
    if budget is not None and budget == flatten(new).get("selection.budget"):
        changes = [c for c in changes if c[0] not in budget_keys]
    blocked = [c for c in changes if not resumable(c[0])]
    if blocked and policy != "force":
        text = ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in blocked)
        raise ResumeConflict(
            f"{where}: this run was started with another config ({text}); use a new run.name=<name> for a new run, "
            "run.resume=force to continue this one with the change, or run.resume=never to start it afresh")
    return changes


def record(run_dir: RunDir, event: str, start_epoch: int, changes: list | None = None, **extra) -> None:
    """Append one line to ``history.jsonl``: what started, from which epoch, with which config changes (against
    the config that trained the epochs before it), and ``extra`` (``epochs``: the epoch count it trains to)."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, "start_epoch": int(start_epoch),
           "changes": [{"key": k, "old": o, "new": n} for k, o, n in (changes or [])], **extra}
    p = run_dir.sub("history.jsonl")
    with open(p, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def amend_last(run_dir: RunDir, **fields) -> None:
    """Update the newest line of ``history.jsonl`` (this attempt's start or resume) with ``fields``."""
    rows = read_history(run_dir)
    if not rows:
        return
    rows[-1].update(fields)
    run_dir.write_text("history.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))


def trained_under(history: list[dict], epochs: int) -> list[dict]:
    """Which epochs trained under which config: ``[{"epochs": [first, end), "changes": [...]}, ...]`` from the
    start and resume lines of ``history.jsonl`` (a later line starting at epoch s replaces what earlier ones
    trained from s on: the epochs past a checkpoint were trained again). ``changes``: against the segment
    before (a forced change shows here); the last segment's config is the run's config.yaml."""
    segments: list[dict] = []
    for row in history:
        if row.get("event") not in ("start", "resume"):
            continue
        s = int(row.get("start_epoch", 0))
        segments = [seg for seg in segments if seg["epochs"][0] < s]
        if segments:
            segments[-1]["epochs"][1] = s
        segments.append({"epochs": [s, int(epochs)], "changes": list(row.get("changes") or [])})
    return [seg for seg in segments if seg["epochs"][0] < seg["epochs"][1]]


def read_history(run_dir: RunDir) -> list[dict]:
    p = run_dir.path / "history.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
