"""A sweep stopped by Ctrl-C: its unfinished trials' run folders say ``interrupted`` and the driver exits with the
command that resumes it (Tune reports a stopped trial as TERMINATED, like a finished one)."""

from __future__ import annotations

from kcd_ray.sweeps.spec import Sweep


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the unfinished trials are marked interrupted and no report is written (it would
    rank a partial sweep); re-running the same command restores it."""

    def __init__(self, sw: Sweep, marked: int, unfinished: int = 0, total: int = 0):
        count = f"{unfinished} of {total} trials unfinished" if total else "trials unfinished"
        super().__init__(f"sweep {sw.name} interrupted: {count} ({marked} run folder(s) marked interrupted), no "
                         f"report written; re-run the same command to resume it (folder {sw.remote or sw.folder})")


def mark_interrupted(sw: Sweep, skip=()) -> int:
    """Trials whose run folder still says ``running`` once Tune stopped them (it ends their processes, so their
    own ``fit`` cannot say it): their status.json says ``interrupted``, or ``stopped_early`` where ASHA stopped them
    (its note in the folder: ``kcd_ray.ray_layer.tune.early_stop``). Returns how many were interrupted. ``skip``:
    run folders of trials Tune reports as failed (a process that died)."""
    import json

    from kcd_ray import storage
    from kcd_ray.report.runs import STOPPED_NOTE

    base = sw.runs_location
    marked = 0
    files = set(storage.list_files(base)) if storage.exists(base) else set()
    for rel in sorted(files):
        if rel.count("/") != 1 or not rel.endswith("/status.json") or rel.split("/", 1)[0] in skip:
            continue
        uri = storage.join(base, rel)
        try:
            status = json.loads(storage.read_text(uri))
        except (OSError, ValueError):
            continue
        if status.get("state") != "running":
            continue
        early = f"{rel.split('/', 1)[0]}/{STOPPED_NOTE}" in files
        storage.write_text(uri, json.dumps({**status, "state": "stopped_early" if early else "interrupted"}, indent=2))
        marked += 0 if early else 1
    return marked


__all__ = ["SweepInterrupted", "mark_interrupted"]
