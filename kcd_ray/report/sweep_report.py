"""The report of a sweep folder (or any folder of runs): one row per run, ``trials.csv``, ``pareto.png`` and
``best_config.yaml`` (the best run's resolved config, renamed and pointed back at the sweep's own storage, which
``kcd-ray distill --config`` runs as is)."""

from __future__ import annotations

import json
from pathlib import Path

from kcd_ray.config import config_from_dict, dump_yaml
from kcd_ray.report.runs import flatten, load_folder, metric_value, strategy_info, variant
from kcd_ray.report.tables import fmt, format_table, pareto_flags, write_csv

# Run bookkeeping that differs between trials by construction: never a "varying" config value.
IGNORED_KEYS = ("run.name", "run.storage_path", "run.ray_address", "run.verbose")
RESULT_COLUMNS = ("final_top1", "best_top1", "compute_ratio", "wall_seconds")


def _varying(flat: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if k not in IGNORED_KEYS
            and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def trial_rows(runs: list[dict], metric: str) -> tuple[list[dict], list[str]]:
    """(one row per run: strategy, status, the varying config values, results; the varying keys)."""
    flat = [flatten(r["config"]) for r in runs]
    varying = _varying(flat)
    rows = []
    for r, f in zip(runs, flat):
        s = r["summary"]
        row = {"run": r["name"], "variant": variant(r), "status": r["status"], "info": strategy_info(r),
               **{k: f.get(k) for k in varying}}
        row.update({k: s.get(k) for k in RESULT_COLUMNS + ("best_epoch", "sample_passes")})
        row["epochs_done"] = len(r["metrics"]) or s.get("epochs")
        row[metric] = metric_value(r, metric) if metric not in row else row[metric]
        rows.append(row)
    return rows, varying


def mark_pareto(rows: list[dict], y_key: str) -> None:
    """``pareto`` on each row: non-dominated in (compute_ratio, y_key), over finished runs when there are any (a
    stopped run's figures are only "so far")."""
    idx = [i for i, r in enumerate(rows) if r.get("compute_ratio") is not None and r.get(y_key) is not None]
    idx = [i for i in idx if rows[i]["status"] == "done"] or idx
    for i, flag in zip(idx, pareto_flags([(rows[i]["compute_ratio"], rows[i][y_key]) for i in idx])):
        rows[i]["pareto"] = flag
    for r in rows:
        r.setdefault("pareto", False)


def best_index(rows: list[dict], metric: str, mode: str):
    ranked = [i for i, r in enumerate(rows) if r.get(metric) is not None]
    done = [i for i in ranked if rows[i]["status"] == "done"] or ranked
    return (max if mode == "max" else min)(done, key=lambda i: rows[i][metric]) if done else None


def write_best_config(run: dict, meta: dict, name: str, folder: Path, out: Path) -> tuple[dict, str, Path]:
    """The best run's config as ``<out>/best_config.yaml``, renamed ``<sweep>-best`` in the sweep's own storage
    (kept in the trial's folder it would "resume" the finished trial)."""
    cfg = json.loads(json.dumps(run["config"]))
    base_run = (meta.get("base") or {}).get("run", {})
    cfg.setdefault("run", {})["name"] = f"{name}-best"
    cfg["run"]["storage_path"] = base_run.get("storage_path", str(folder.parent))
    cfg["run"]["ray_address"] = base_run.get("ray_address", "")
    text_yaml = dump_yaml(config_from_dict(cfg))
    best_path = out / "best_config.yaml"
    best_path.write_text(text_yaml)
    return cfg, text_yaml, best_path


def sweep_report(path: Path, out: Path) -> dict:
    meta, name, runs_root, runs = load_folder(path)
    metric, mode = meta.get("metric", "best_top1"), meta.get("mode", "max")
    rows, varying = trial_rows(runs, metric)
    y_key = "final_top1" if metric in ("top1", "final_top1") else "best_top1"
    mark_pareto(rows, y_key)
    best_i = best_index(rows, metric, mode)
    columns = ["run", "variant", "status", *varying, "final_top1", "best_top1", "compute_ratio", "wall_seconds",
               "epochs_done", "pareto"] + ([metric] if metric not in ("final_top1", "best_top1") else [])
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, columns + ["best_epoch", "sample_passes"], out / "trials.csv")
    from kcd_ray.plots import pareto_plot  # matplotlib: imported only when drawing

    png = pareto_plot(rows, y_key, out / "pareto.png", f"{name}: {y_key} vs compute")
    res = {"kind": "sweep", "path": str(path), "name": name, "metric": metric, "mode": mode, "rows": rows,
           "varying": varying, "csv": str(csv_path), "png": str(png), "best": None, "best_config": None,
           "best_config_yaml": "", "best_config_path": None}
    text = [f"sweep {name}: {len(rows)} runs ({sum(r['status'] == 'done' for r in rows)} done) in {runs_root}",
            format_table(rows, columns), f"CSV: {csv_path}", f"plot: {png}"]
    if best_i is not None:
        cfg, text_yaml, best_path = write_best_config(runs[best_i], meta, name, path, out)
        res.update(best=rows[best_i], best_config=cfg, best_config_yaml=text_yaml, best_config_path=str(best_path))
        text += [f"best by {metric} ({mode}): {runs[best_i]['name']} = {fmt(rows[best_i][metric])}; config "
                 f"({best_path}, runs with `kcd-ray distill --config {best_path}`):", text_yaml.rstrip()]
    res["text"] = "\n".join(text)
    return res
