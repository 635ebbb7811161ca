"""Reading run folders for reports: a run's summary, metrics and config, its status in a sweep, and how to draw
its strategy (from what the run recorded about it, so a report draws any strategy, registered here or not)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

_METRIC_ALIASES = {"top1": "final_top1", "top5": "final_top5", "val_top1": "final_val_top1",
                   "val_top5": "final_val_top5", "val_loss": "final_val_loss"}
_UNFINISHED = {"TERMINATED": "stopped", "ERROR": "error", "RUNNING": "unfinished", "PENDING": "unfinished",
               "PAUSED": "unfinished"}


def is_run(p: Path) -> bool:
    return (p / "metrics.jsonl").is_file() or (p / "summary.json").is_file()


def read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def _read_metrics(p: Path) -> list[dict]:
    from kcd_ray.engine.rundir import RunDir

    return RunDir(p).read_metrics()


def _summary_from_metrics(metrics: list[dict], config: dict) -> dict:
    """What an unfinished run's summary would say so far (stopped early by ASHA, failed, or still running)."""
    if not metrics:
        return {}
    best = max(metrics, key=lambda m: m.get("top1", -math.inf))
    last = metrics[-1]
    return {"final_top1": last.get("top1"), "best_top1": best.get("top1"), "best_epoch": best.get("epoch"),
            "compute_ratio": last.get("compute_ratio"), "sample_passes": last.get("sample_passes"),
            "wall_seconds": last.get("wall_seconds"), "epochs": config.get("optim", {}).get("epochs"),
            "kcd_enabled": last.get("kcd_enabled", config.get("kcd", {}).get("enabled")),
            "strategy": last.get("strategy"), "sample_pass_ratio": last.get("sample_pass_ratio")}


STOPPED_NOTE = "stopped_early.json"  # a sweep's scheduler stopped the run: the epoch and metric it stopped it at


def load_run(p: Path) -> dict:
    """A run folder as {name, path, status, summary, metrics, config}; unfinished runs are summarised from metrics."""
    summary = read_json(p / "summary.json") if (p / "summary.json").is_file() else None
    metrics = _read_metrics(p)
    config = (summary or {}).get("config")
    if config is None and (p / "config.yaml").is_file():
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    config = config or {}
    status = "done" if summary is not None else "stopped early" if (p / STOPPED_NOTE).is_file() else "incomplete"
    if summary is None:
        summary = _summary_from_metrics(metrics, config)
    return {"name": p.name, "path": p, "status": status, "summary": summary, "metrics": metrics, "config": config}


def tune_states(tune_dir: Path) -> dict:
    """Trial folder name -> Tune status, from Tune's latest experiment state ({} if unreadable).

    It tells an early-stopped trial (TERMINATED without a summary) from a failed or interrupted one.
    """
    try:
        latest = sorted(tune_dir.glob("experiment_state-*.json"))[-1]
        states = {}
        for item in json.loads(latest.read_text())["trial_data"]:
            t = json.loads(item[0]) if isinstance(item[0], str) else item[0]
            states[t["relative_logdir"]] = t["status"]
        return states
    except (IndexError, KeyError, TypeError, ValueError, OSError):
        return {}


def load_folder(path: Path) -> tuple[dict, str, Path, list[dict]]:
    """A sweep folder or a folder of runs: (its sweep.yaml or {}, name, runs folder, runs with Tune's status)."""
    meta = yaml.safe_load((path / "sweep.yaml").read_text()) if (path / "sweep.yaml").is_file() else {}
    runs_root = path / "runs" if (path / "runs").is_dir() else path
    runs = [load_run(d) for d in sorted(runs_root.iterdir()) if d.is_dir() and is_run(d)]
    if not runs:
        raise ValueError(f"{path}: not a sweep or run folder: no run folders found (expected "
                         "runs/<name>/metrics.jsonl or summary.json, or a single run folder)")
    name = (meta or {}).get("name", path.name)
    states = tune_states(path / "tune")
    for r in runs:  # run folder <sweep name>_<trial folder>
        state = states.get(r["name"][len(name) + 1:]) if r["name"].startswith(name + "_") else None
        if r["status"] == "incomplete" and state in _UNFINISHED:
            r["status"] = _UNFINISHED[state]
    return meta or {}, name, runs_root, runs


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def metric_value(run: dict, metric: str):
    key = _METRIC_ALIASES.get(metric, metric)
    v = run["summary"].get(key)
    if v is None and run["metrics"]:
        v = run["metrics"][-1].get(metric)
    return v


# --------------------------------------------------------------------------- how to draw a run's strategy

_TEACHER = {"name": "teacher", "tag": "teacher", "label": "teacher", "colour": "", "marker": "o", "sections": []}


def _strategy_name(run: dict) -> str:
    s, c = run["summary"], run["config"]
    if s.get("strategy"):  # the compute ledger and the summary record it
        return s["strategy"]
    # a run from before strategies were recorded: KCD or plain KD by kcd.enabled
    return "kcd" if s.get("kcd_enabled", c.get("kcd", {}).get("enabled", True)) else "none"


def strategy_info(run: dict) -> dict:
    """How a report draws the run: what its summary recorded (``strategy_info``), else what the registered strategy
    of that name declares, else its name (a strategy this install does not know)."""
    if run["summary"].get("kind") == "teacher":
        return _TEACHER
    recorded = run["summary"].get("strategy_info") or {}
    name = recorded.get("name") or _strategy_name(run)
    declared = _declared(name)
    return {"name": name, "tag": name, "label": name, "colour": "", "marker": "o", "sections": [],
            **declared, **recorded}


def _declared(name: str) -> dict:
    from kcd_ray.config import Config
    from kcd_ray.engine.selection import STRATEGIES

    if name not in STRATEGIES or name in STRATEGIES.aliases:
        return {}
    return STRATEGIES.get(name).info(Config())


def variant(run: dict) -> str:
    """The short tag of the run's strategy (``kd`` for plain KD, ``kcd``, ...) or ``teacher``."""
    return strategy_info(run)["tag"]
