"""`kcd-ray report`: a table, a CSV and a PNG for a sweep folder (or any folder of runs) or for one run. No Ray.

- A sweep or folder of runs (``sweep_report``): one row per run, ``trials.csv``, ``pareto.png`` (top-1 against
  compute_ratio, Pareto front, plain-KD trial starred) and ``best_config.yaml``.
- One run folder (``run_report``): the per-epoch table, ``epochs.csv`` and ``curves.png``.
- Several folders, or one with ``--compare`` (``compare``): one point per strategy and setting, averaged over seeds.
- A sweep's PBT schedule (``pbt``). Strategies are drawn as their runs recorded them (``runs.strategy_info``).
"""

from __future__ import annotations

import os
from pathlib import Path

from kcd_ray.report.compare import aggregate_points, compare_report
from kcd_ray.report.run_report import run_report
from kcd_ray.report.runs import is_run, load_run
from kcd_ray.report.sweep_report import sweep_report
from kcd_ray.report.tables import format_table, mean_se, pareto_flags


def report(path, out_dir=None, *, compare: bool = False) -> dict:
    """Report on a sweep folder, a folder of run folders, or one run folder; files go to ``out_dir`` (default: path).

    Several folders (a list), or ``compare=True``: :func:`compare_report`, one Pareto plot over all of them.
    A folder in an object store (``s3://...``) is fetched into a local working copy (no checkpoints or model
    files), reported there, and the report's files are uploaded beside it (or to ``out_dir``)."""
    from kcd_ray import storage

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    uris = ([str(p) for p in paths if storage.is_uri(p)]
            + ([str(out_dir)] if out_dir and storage.is_uri(out_dir) else []))
    if not uris:
        return _report(paths, out_dir, compare)
    for uri in uris:
        storage.check(uri, "report")
    local = [_fetch_folder(str(p)) if storage.is_uri(p) else p for p in paths]
    out_local = storage.stage_dir(str(out_dir)) if out_dir and storage.is_uri(out_dir) else out_dir
    res = _report(local, out_local, compare)
    _publish(res, dict(storage.stage_root(u) for u in uris))
    return res


_REPORT_FILES = ("csv", "png", "pareto_csv", "best_config_path")


def _fetch_folder(uri: str) -> Path:
    """A fresh working copy of a sweep or run folder in an object store: what a report reads (no checkpoints,
    no model files)."""
    import shutil

    from kcd_ray import storage

    local = storage.stage_dir(uri)
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for rel in storage.list_files(uri):
        if "checkpoint_" not in rel and not rel.endswith(".pt"):
            storage.download(storage.join(uri, rel), local / rel)
    return local


def _publish(res: dict, roots: dict) -> None:
    """Upload the report's files to the store and name them (and the paths inside its text files) by URI."""
    from kcd_ray import storage

    def to_uri(text: str) -> str:
        for local, uri in roots.items():
            text = text.replace(local, uri)
        return text

    for key in _REPORT_FILES:
        if res.get(key):
            f = Path(res[key])
            data = f.read_bytes() if f.suffix == ".png" else to_uri(f.read_text()).encode()
            res[key] = to_uri(str(f))
            storage.write_bytes(res[key], data)
    res["text"] = to_uri(res["text"])
    if res.get("best_config_yaml"):
        res["best_config_yaml"] = to_uri(res["best_config_yaml"])


def _report(paths: list, out_dir, compare: bool) -> dict:
    if compare or len(paths) > 1:
        return compare_report(paths, out_dir)
    p = Path(paths[0]).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such folder (expected a sweep folder or a run folder)")
    out = Path(out_dir).expanduser() if out_dir else p
    return run_report(p, out) if is_run(p) else sweep_report(p, out)


def add_report_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="path",
                   help="a sweep folder (<storage>/<sweep name>), a folder of runs, or one run folder; several "
                        "folders: one Pareto plot comparing them (e.g. runs/sweeps/rho runs/sweeps/infobatch)")
    p.add_argument("--out-dir", default=None,
                   help="where the CSV, PNG and best_config.yaml go (default: the folder; for several folders, "
                        "their common parent: compare_points.csv, compare_pareto.png)")
    p.add_argument("--compare", action="store_true",
                   help="for one folder too: average runs over seeds into points and compare strategies, as for "
                        "several folders")


def main_report(args) -> int:
    print(report(args.paths, args.out_dir, compare=args.compare)["text"], flush=True)
    return 0


__all__ = ["add_report_arguments", "aggregate_points", "compare_report", "format_table", "load_run", "main_report",
           "mean_se", "pareto_flags", "report", "run_report", "sweep_report"]
