"""`kcd-ray report`: a table, a CSV and a PNG for a sweep folder (or any folder of runs) or for one run.

- Sweep / folder of runs: one row per run (the config values that vary, final and best top-1,
  compute_ratio, wall time), ``trials.csv``, ``pareto.png`` (top-1 against compute_ratio, Pareto
  front, plain-KD trial starred) and ``best_config.yaml``: the best run's resolved config, renamed and
  pointed back at the sweep's own storage, which `kcd-ray distill --config` runs as is.
- One run folder: the per-epoch table, ``epochs.csv`` and ``curves.png`` (top-1, kept fraction, T, loss).
- Several folders (``kcd-ray report runs/sweeps/rho runs/sweeps/infobatch runs/sweeps/random_subset``), or one with
  ``--compare``: one point per strategy and setting, runs that differ only in ``optim.seed`` averaged (final top-1
  mean and standard error, mean compute_ratio), a table of the points with the Pareto front marked,
  ``compare_points.csv`` and ``compare_pareto.png`` (one colour per strategy, error bars, plain KD starred).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import yaml

from kcd_ray.config import config_from_dict, dump_yaml

# Run bookkeeping that differs between trials by construction: never a "varying" config value.
IGNORED_KEYS = ("run.name", "run.storage_path", "run.ray_address", "run.verbose")
RESULT_COLUMNS = ("final_top1", "best_top1", "compute_ratio", "wall_seconds")
EPOCH_COLUMNS = ("epoch", "top1", "top5", "kept_fraction", "T", "stage", "train_loss", "lr", "epoch_seconds")
_METRIC_ALIASES = {"top1": "final_top1", "top5": "final_top5"}


def _is_run(p: Path) -> bool:
    return (p / "metrics.jsonl").is_file() or (p / "summary.json").is_file()


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def _read_metrics(p: Path) -> list[dict]:
    from kcd_ray.engine.rundir import RunDir

    return RunDir(p).read_metrics()


def load_run(p: Path) -> dict:
    """A run folder as {name, path, status, summary, metrics, config}; unfinished runs are summarised from metrics."""
    summary = _read_json(p / "summary.json") if (p / "summary.json").is_file() else None
    metrics = _read_metrics(p)
    config = (summary or {}).get("config")
    if config is None and (p / "config.yaml").is_file():
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    if summary is None:  # stopped early (ASHA), failed, or still running
        summary = {}
        if metrics:
            best = max(metrics, key=lambda m: m.get("top1", -math.inf))
            last = metrics[-1]
            summary = {"final_top1": last.get("top1"), "best_top1": best.get("top1"), "best_epoch": best.get("epoch"),
                       "compute_ratio": last.get("compute_ratio"), "sample_passes": last.get("sample_passes"),
                       "wall_seconds": last.get("wall_seconds"), "epochs": (config or {}).get("optim", {}).get("epochs"),
                       "kcd_enabled": last.get("kcd_enabled", (config or {}).get("kcd", {}).get("enabled")),
                       "strategy": last.get("strategy"), "sample_pass_ratio": last.get("sample_pass_ratio")}
        status = "incomplete"
    else:
        status = "done"
    return {"name": p.name, "path": p, "status": status, "summary": summary, "metrics": metrics, "config": config or {}}


def _tune_states(tune_dir: Path) -> dict:
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


_UNFINISHED = {"TERMINATED": "stopped", "ERROR": "error", "RUNNING": "unfinished", "PENDING": "unfinished",
               "PAUSED": "unfinished"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _variant(run: dict) -> str:
    s, c = run["summary"], run["config"]
    if s.get("kind") == "teacher":
        return "teacher"
    if s.get("strategy"):  # selection.strategy (the compute ledger writes it): none is plain KD
        return {"none": "kd"}.get(s["strategy"], s["strategy"])
    enabled = s.get("kcd_enabled", c.get("kcd", {}).get("enabled", True))
    return "kcd" if enabled else "kd"


def _metric_value(run: dict, metric: str):
    key = _METRIC_ALIASES.get(metric, metric)
    v = run["summary"].get(key)
    if v is None and run["metrics"]:
        v = run["metrics"][-1].get(metric)
    return v


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v != v or abs(v) >= 1e5 or (0 < abs(v) < 1e-3):
            return f"{v:.4g}"
        digits = 2 if abs(v) >= 10 else (3 if abs(v) >= 1 else 4)
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _write_csv(rows: list[dict], columns: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: json.dumps(r[c]) if isinstance(r.get(c), (list, dict)) else r.get(c) for c in columns})
    return path


def pareto_flags(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, value) pairs: True where no other point costs no more and is worth at least as much (one strictly)."""
    flags = []
    for i, (c, v) in enumerate(points):
        dominated = any(c2 <= c and v2 >= v and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def _load_folder(path: Path) -> tuple[dict, str, Path, list[dict]]:
    """A sweep folder or a folder of runs: (its sweep.yaml or {}, name, runs folder, runs with Tune's status)."""
    meta = yaml.safe_load((path / "sweep.yaml").read_text()) if (path / "sweep.yaml").is_file() else {}
    runs_root = path / "runs" if (path / "runs").is_dir() else path
    runs = [load_run(d) for d in sorted(runs_root.iterdir()) if d.is_dir() and _is_run(d)]
    if not runs:
        raise ValueError(f"{path}: not a sweep or run folder: no run folders found (expected "
                         "runs/<name>/metrics.jsonl or summary.json, or a single run folder)")
    name = (meta or {}).get("name", path.name)
    states = _tune_states(path / "tune")
    for r in runs:  # run folder <sweep name>_<trial folder>
        state = states.get(r["name"][len(name) + 1:]) if r["name"].startswith(name + "_") else None
        if r["status"] != "done" and state in _UNFINISHED:
            r["status"] = _UNFINISHED[state]
    return meta or {}, name, runs_root, runs


def _sweep_report(path: Path, out: Path) -> dict:
    meta, name, runs_root, runs = _load_folder(path)
    metric, mode = meta.get("metric", "best_top1"), meta.get("mode", "max")
    flat = [_flatten(r["config"]) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    varying = [k for k in keys if k not in IGNORED_KEYS
               and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
    rows = []
    for r, f in zip(runs, flat):
        s = r["summary"]
        row = {"run": r["name"], "variant": _variant(r), "status": r["status"], **{k: f.get(k) for k in varying}}
        row.update({k: s.get(k) for k in RESULT_COLUMNS + ("best_epoch", "sample_passes")})
        row["epochs_done"] = len(r["metrics"]) or s.get("epochs")
        row[metric] = _metric_value(r, metric) if metric not in row else row[metric]
        rows.append(row)
    y_key = "final_top1" if _METRIC_ALIASES.get(metric) == "final_top1" or metric == "final_top1" else "best_top1"
    # The front is drawn over finished runs: a stopped run's compute ratio and top-1 are only "so far".
    idx = [i for i, r in enumerate(rows) if r.get("compute_ratio") is not None and r.get(y_key) is not None]
    idx = [i for i in idx if rows[i]["status"] == "done"] or idx
    for i, flag in zip(idx, pareto_flags([(rows[i]["compute_ratio"], rows[i][y_key]) for i in idx])):
        rows[i]["pareto"] = flag
    for r in rows:
        r.setdefault("pareto", False)

    ranked = [i for i, r in enumerate(rows) if r.get(metric) is not None]
    done = [i for i in ranked if rows[i]["status"] == "done"] or ranked
    best_i = (max if mode == "max" else min)(done, key=lambda i: rows[i][metric]) if done else None

    columns = ["run", "variant", "status", *varying, "final_top1", "best_top1", "compute_ratio", "wall_seconds",
               "epochs_done", "pareto"] + ([metric] if metric not in ("final_top1", "best_top1") else [])
    out.mkdir(parents=True, exist_ok=True)
    csv_path = _write_csv(rows, columns + ["best_epoch", "sample_passes"], out / "trials.csv")
    from kcd_ray.ray_layer.tune.plots import pareto_plot  # matplotlib: imported only when drawing

    png = pareto_plot(rows, y_key, out / "pareto.png", f"{name}: {y_key} vs compute")
    res = {"kind": "sweep", "path": str(path), "name": name, "metric": metric, "mode": mode, "rows": rows,
           "varying": varying, "csv": str(csv_path), "png": str(png), "best": None, "best_config": None,
           "best_config_yaml": "", "best_config_path": None}
    text = [f"sweep {name}: {len(rows)} runs ({sum(r['status'] == 'done' for r in rows)} done) in {runs_root}",
            format_table(rows, columns), f"CSV: {csv_path}", f"plot: {png}"]
    if best_i is not None:
        best = runs[best_i]
        cfg = json.loads(json.dumps(best["config"]))
        base_run = (meta.get("base") or {}).get("run", {})
        cfg.setdefault("run", {})["name"] = f"{name}-best"
        # Back to the sweep's own storage: kept in the trial's folder it would "resume" the finished trial.
        cfg["run"]["storage_path"] = base_run.get("storage_path", str(path.parent))
        cfg["run"]["ray_address"] = base_run.get("ray_address", "")
        text_yaml = dump_yaml(config_from_dict(cfg))
        best_path = out / "best_config.yaml"
        best_path.write_text(text_yaml)
        res.update(best=rows[best_i], best_config=cfg, best_config_yaml=text_yaml, best_config_path=str(best_path))
        text += [f"best by {metric} ({mode}): {best['name']} = {_fmt(rows[best_i][metric])}; config "
                 f"({best_path}, runs with `kcd-ray distill --config {best_path}`):", text_yaml.rstrip()]
    res["text"] = "\n".join(text)
    return res


def _run_report(path: Path, out: Path) -> dict:
    run = load_run(path)
    rows = [dict(m, epoch=m.get("epoch", i) + 1) for i, m in enumerate(run["metrics"])]  # 1-based for people
    columns = [c for c in EPOCH_COLUMNS if any(c in r for r in rows)] + sorted({k for r in rows for k in r if k.startswith("loss_")})
    out.mkdir(parents=True, exist_ok=True)
    all_cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    csv_path = _write_csv(rows, all_cols, out / "epochs.csv")
    from kcd_ray.ray_layer.tune.plots import curves_plot

    png = curves_plot(run["metrics"], out / "curves.png", f"{run['name']} ({_variant(run)}, {run['status']})")
    s = run["summary"]
    text = [f"run {run['name']} ({_variant(run)}, {run['status']}): {len(rows)} epochs", format_table(rows, columns)]
    if s:
        text.append("final top-1 {} | best top-1 {} (epoch {}) | compute ratio {} | wall {} s".format(
            _fmt(s.get("final_top1")), _fmt(s.get("best_top1")),
            _fmt(None if s.get("best_epoch") is None else s["best_epoch"] + 1), _fmt(s.get("compute_ratio")),
            _fmt(s.get("wall_seconds"))))
    text += [f"CSV: {csv_path}", f"plot: {png}"]
    return {"kind": "run", "path": str(path), "rows": rows, "summary": s, "status": run["status"], "csv": str(csv_path),
            "png": str(png), "text": "\n".join(text)}


# --------------------------------------------------------------------------- several sweeps: one Pareto plot

# Config keys that never make two runs different experiments when grouping runs into points: the seed (a point
# averages over it), the strategy (its own column) and bookkeeping. run.* is all bookkeeping.
GROUP_IGNORED = ("optim.seed", "optim.threads", "selection.strategy", "kcd.enabled")
STRATEGY_ORDER = ("kd", "kcd", "infobatch", "unixkd", "random")
POINT_COLUMNS = ("strategy", "setting", "compute_ratio", "sample_pass_ratio", "final_top1_mean", "final_top1_se",
                 "n_seeds", "seeds", "n_runs", "best_top1_mean", "pareto", "folders")


def _relevant(flat: dict, variant: str) -> dict:
    """The config values that can change a run of this strategy: kcd.* only for KCD (or a random subset on KCD's
    schedule), selection.<strategy>.* only for that strategy; seed, strategy and run.* bookkeeping left out."""
    follow = variant == "random" and bool(flat.get("selection.random.follow_kcd_schedule"))
    out = {}
    for k, v in flat.items():
        parts = k.split(".")
        if parts[0] == "run" or k in GROUP_IGNORED:
            continue
        if parts[0] == "kcd" and variant != "kcd" and not follow:
            continue
        if parts[0] == "selection" and len(parts) > 2 and parts[1] != variant:
            continue
        if k == "selection.seed" and variant in ("kd", "kcd"):
            continue
        out[k] = v
    return out


def _mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); no SE from one value."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)


def _seed_order(seed):
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def aggregate_points(runs: list[dict]) -> list[dict]:
    """Finished distillation runs -> one point per (strategy, setting): runs that differ only in ``optim.seed``
    (and bookkeeping) are one point, its final top-1 the mean over seeds with the standard error, its compute
    ratio the mean. Runs of the same seed (plain-KD baselines of several sweeps) are averaged first, so ``n_seeds``
    counts distinct seeds. ``setting`` names the config values that tell the point from its strategy's others."""
    groups: dict[tuple, dict] = {}
    for r in runs:
        variant = _variant(r)
        flat = _flatten(r["config"])
        rel = _relevant(flat, variant)
        key = (variant, json.dumps(rel, sort_keys=True, default=str))
        g = groups.setdefault(key, {"strategy": variant, "values": rel, "runs": []})
        g["runs"].append((flat.get("optim.seed"), r))
    by_strategy: dict[str, list[dict]] = {}
    for g in groups.values():
        by_strategy.setdefault(g["strategy"], []).append(g)
    points = []
    for variant, gs in by_strategy.items():
        keys = list(dict.fromkeys(k for g in gs for k in g["values"]))
        varying = [k for k in keys if len({json.dumps(g["values"].get(k), sort_keys=True, default=str)
                                           for g in gs}) > 1]
        for g in gs:
            per_seed: dict = {}
            for seed, r in g["runs"]:
                per_seed.setdefault(json.dumps(seed), []).append(r["summary"])

            def seed_means(key):
                vals = [[s.get(key) for s in ss] for ss in per_seed.values()]
                if any(v is None for vs in vals for v in vs):
                    return None
                return [sum(vs) / len(vs) for vs in vals]

            top1, cr = seed_means("final_top1"), seed_means("compute_ratio")
            spr, best = seed_means("sample_pass_ratio"), seed_means("best_top1")
            mean, se = _mean_se(top1)
            points.append({
                "strategy": variant,
                "setting": ", ".join(f"{k}={_fmt(g['values'].get(k))}" for k in varying) or "-",
                "compute_ratio": sum(cr) / len(cr), "sample_pass_ratio": None if spr is None else sum(spr) / len(spr),
                "final_top1_mean": mean, "final_top1_se": se, "n_seeds": len(per_seed),
                "seeds": sorted((json.loads(k) for k in per_seed), key=_seed_order),
                "n_runs": len(g["runs"]), "best_top1_mean": None if best is None else sum(best) / len(best),
                "folders": sorted({str(r.get("folder", r["path"].parent)) for _, r in g["runs"]}),
                "runs": [r["name"] for _, r in g["runs"]], "values": {k: g["values"].get(k) for k in varying},
            })
    order = {s: i for i, s in enumerate(STRATEGY_ORDER)}
    points.sort(key=lambda p: (order.get(p["strategy"], len(order)), p["strategy"], p["compute_ratio"], p["setting"]))
    for p, flag in zip(points, pareto_flags([(p["compute_ratio"], p["final_top1_mean"]) for p in points])):
        p["pareto"] = flag
    return points


def _collect(path: Path) -> tuple[str, list[dict]]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected a sweep folder or a run folder)")
    if _is_run(path):
        return path.name, [load_run(path)]
    _, name, _, runs = _load_folder(path)
    return name, runs


def compare_report(paths, out_dir=None) -> dict:
    """Several sweep folders (or run folders) -> one Pareto plot of final top-1 against compute ratio, one colour
    per strategy, points averaged over seeds (error bars: standard error), plain KD starred; the points as a text
    table and ``compare_points.csv``, the plot ``compare_pareto.png`` (in ``out_dir``, default: the folders'
    common parent). Only finished distillation runs count; unfinished ones and teachers are listed as skipped."""
    folders = [Path(p).expanduser() for p in paths]
    if not folders:
        raise ValueError("report: no folders given")
    seen, runs, lines, skipped = set(), [], [], {"unfinished": 0, "teacher": 0, "no compute_ratio or top-1": 0}
    for f in folders:
        name, found = _collect(f)
        counts: dict[str, int] = {}
        for r in found:
            where = r["path"].resolve()
            if where in seen:
                continue
            seen.add(where)
            if r["status"] != "done":
                skipped["unfinished"] += 1
            elif _variant(r) == "teacher":
                skipped["teacher"] += 1
            elif r["summary"].get("compute_ratio") is None or r["summary"].get("final_top1") is None:
                skipped["no compute_ratio or top-1"] += 1
            else:
                runs.append(dict(r, folder=f))
                counts[_variant(r)] = counts.get(_variant(r), 0) + 1
        lines.append(f"  {f} ({name}): {len(found)} runs, {sum(counts.values())} used"
                     + "".join(f"; {v} x{n}" for v, n in counts.items()))
    if not runs:
        raise ValueError(f"{', '.join(map(str, folders))}: no finished distillation runs to compare")
    points = aggregate_points(runs)
    if out_dir:
        out = Path(out_dir).expanduser()
    else:
        resolved = [f.resolve() for f in folders]
        out = resolved[0] if len(resolved) == 1 else Path(os.path.commonpath(resolved))
    out.mkdir(parents=True, exist_ok=True)
    csv_path = _write_csv(points, list(POINT_COLUMNS), out / "compare_points.csv")
    from kcd_ray.ray_layer.tune.plots import pareto_plot

    shown = [dict(p, final_top1=p["final_top1_mean"]) for p in points]
    png = pareto_plot(shown, "final_top1", out / "compare_pareto.png",
                      "final top-1 vs compute: " + ", ".join(dict.fromkeys(p["strategy"] for p in points)),
                      err_key="final_top1_se", group_key="strategy")
    rows = [dict(p, top1=_fmt(p["final_top1_mean"]) + ("" if p["final_top1_se"] is None
                                                       else f" +- {_fmt(p['final_top1_se'])}"),
                 pareto="yes" if p["pareto"] else "") for p in points]
    columns = ["strategy", "setting", "compute_ratio", "top1", "n_seeds", "n_runs", "pareto"]
    front = [p for p in sorted(points, key=lambda p: p["compute_ratio"]) if p["pareto"]]
    text = [f"compare {len(folders)} folder(s): {len(runs)} finished runs -> {len(points)} points "
            "(final top-1: mean +- standard error over seeds)", *lines]
    if any(skipped.values()):
        text.append("skipped: " + ", ".join(f"{n} {k}" for k, n in skipped.items() if n))
    text += [format_table(rows, columns),
             "Pareto front (cheapest first): " + "; ".join(
                 f"{p['strategy']}{'' if p['setting'] == '-' else ' ' + p['setting']} "
                 f"({_fmt(p['compute_ratio'])}, {_fmt(p['final_top1_mean'])})"
                 for p in front),
             f"CSV: {csv_path}", f"plot: {png}"]
    return {"kind": "compare", "paths": [str(f) for f in folders], "points": points,
            "pareto": front, "skipped": skipped, "csv": str(csv_path), "png": str(png), "text": "\n".join(text)}


def report(path, out_dir=None, *, compare: bool = False) -> dict:
    """Report on a sweep folder, a folder of run folders, or one run folder; files go to ``out_dir`` (default: path).

    Several folders (a list), or ``compare=True``: :func:`compare_report`, one Pareto plot over all of them.
    A folder in an object store (``s3://...``) is fetched into a local working copy (no checkpoints or model
    files), reported there, and the report's files are uploaded beside it (or to ``out_dir``)."""
    from kcd_ray import storage

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    uris = [str(p) for p in paths if storage.is_uri(p)] + ([str(out_dir)] if out_dir and storage.is_uri(out_dir) else [])
    if not uris:
        return _report(paths, out_dir, compare)
    for uri in uris:
        storage.check(uri, "report")
    local = [_fetch_folder(str(p)) if storage.is_uri(p) else p for p in paths]
    out_local = storage.stage_dir(str(out_dir)) if out_dir and storage.is_uri(out_dir) else out_dir
    res = _report(local, out_local, compare)
    _publish(res, dict(storage.stage_root(u) for u in uris))
    return res


_REPORT_FILES = ("csv", "png", "best_config_path")


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
    return _run_report(p, out) if _is_run(p) else _sweep_report(p, out)


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
