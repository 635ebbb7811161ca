"""The report of a sweep folder (or any folder of runs): one row per run with the metric the sweep selects on and
its test accuracy, ``trials.csv``, the accuracy-compute front (``pareto.png``, ``pareto.csv``) and
``best_config.yaml`` (the best run's resolved config, renamed and pointed back at the sweep's own storage, which
``kcd-ray distill --config`` runs as is); with ``selection.budget`` in the space, the best config of each budget.

The best run is chosen by the sweep's metric, on validation for sweeps that have one; its test accuracy is then
reported once, beside it. A sweep that selects on a test metric (``select_on_test``), or runs without validation
figures (made before validation splits), are labelled as such.
"""

from __future__ import annotations

import json
from pathlib import Path

from kcd_ray.config import config_from_dict, dump_yaml
from kcd_ray.report.runs import flatten, load_folder, metric_value, strategy_info, variant
from kcd_ray.report.tables import fmt, format_table, pareto_flags, write_csv

# Run bookkeeping that differs between trials by construction: never a "varying" config value.
IGNORED_KEYS = ("run.name", "run.storage_path", "run.ray_address", "run.verbose")
RESULT_COLUMNS = ("final_top1", "best_top1", "final_val_top1", "compute_ratio", "planned_compute_ratio",
                  "wall_seconds")
TEST_METRICS = ("top1", "top5", "test_loss", "best_top1", "final_top1", "final_top5", "selected_top1")


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
        if row.get("final_val_top1") is None and r["metrics"]:
            row["final_val_top1"] = r["metrics"][-1].get("val_top1")
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


def best_index(rows: list[dict], metric: str, mode: str, among=None):
    idx = [i for i in (range(len(rows)) if among is None else among) if rows[i].get(metric) is not None]
    done = [i for i in idx if rows[i]["status"] == "done"] or idx
    return (max if mode == "max" else min)(done, key=lambda i: rows[i][metric]) if done else None


def write_best_config(run: dict, meta: dict, name: str, folder: Path, out: Path, file: str = "best_config.yaml",
                      suffix: str = "best") -> tuple[dict, str, Path]:
    """The run's config as ``<out>/<file>``, renamed ``<sweep>-<suffix>`` in the sweep's own storage (kept in the
    trial's folder it would "resume" the finished trial)."""
    cfg = json.loads(json.dumps(run["config"]))
    base_run = (meta.get("base") or {}).get("run", {})
    cfg.setdefault("run", {})["name"] = f"{name}-{suffix}"
    cfg["run"]["storage_path"] = base_run.get("storage_path", str(folder.parent))
    cfg["run"]["ray_address"] = base_run.get("ray_address", "")
    text_yaml = dump_yaml(config_from_dict(cfg))
    best_path = out / file
    best_path.write_text(text_yaml)
    return cfg, text_yaml, best_path


def _selection_note(meta: dict, metric: str, rows: list[dict]) -> str:
    on_test = meta.get("select_on_test") or metric in TEST_METRICS
    if all(r.get("final_val_top1") is None for r in rows):
        return ("these runs have no validation figures (made without data.val_fraction), so nothing was chosen on "
                f"validation; chosen by {metric}" + (", a TEST-split figure: optimistic" if on_test else ""))
    if on_test:
        return (f"chosen by {metric}, a TEST-split figure (select_on_test): the chosen trial's test accuracy is "
                "optimistic")
    return f"chosen on validation ({metric}); its test accuracy is reported once, here"


def _best_per_budget(rows, runs, meta, name, path, out, metric, mode) -> list[str]:
    """With ``selection.budget`` in the space: the best config of each budget, ``best_config_budget<b>.yaml``."""
    if not any("selection.budget" in r for r in rows):
        return []
    lines = []
    for b in sorted({r["selection.budget"] for r in rows if r.get("selection.budget") is not None}):
        i = best_index(rows, metric, mode, [j for j, r in enumerate(rows) if r.get("selection.budget") == b])
        if i is None:
            continue
        _, _, p = write_best_config(runs[i], meta, name, path, out, f"best_config_budget{b:g}.yaml", f"budget{b:g}")
        lines.append(f"  budget {b:g}: {runs[i]['name']} ({rows[i]['variant']}) {metric} {fmt(rows[i][metric])}, "
                     f"test top-1 {fmt(rows[i].get('final_top1'))}, compute {fmt(rows[i].get('compute_ratio'))} -> {p}")
    return ["best config per budget:"] + lines if lines else []


def sweep_report(path: Path, out: Path) -> dict:
    meta, name, runs_root, runs = load_folder(path)
    metric, mode = meta.get("metric", "best_top1"), meta.get("mode", "max")
    rows, varying = trial_rows(runs, metric)
    # The front: validation accuracy against compute (test accuracy for runs without validation figures)
    y_key = "final_val_top1" if any(r.get("final_val_top1") is not None for r in rows) else "final_top1"
    mark_pareto(rows, y_key)
    best_i = best_index(rows, metric, mode)
    shown = [c for c in ("final_val_top1", "final_top1") if c != metric]
    columns = ["run", "variant", "status", *varying, metric, *shown, "compute_ratio", "wall_seconds", "epochs_done",
               "pareto"]
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, columns + ["best_top1", "best_epoch", "sample_passes", "planned_compute_ratio"],
                         out / "trials.csv")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["compute_ratio"])
    pareto_csv = write_csv(front, ["run", "variant", *varying, "compute_ratio", y_key, "final_top1"],
                           out / "pareto.csv")
    from kcd_ray.plots import pareto_plot  # matplotlib: imported only when drawing

    png = pareto_plot(rows, y_key, out / "pareto.png", f"{name}: {y_key} vs compute",
                      beside_key="final_top1" if y_key != "final_top1" else None)
    res = {"kind": "sweep", "path": str(path), "name": name, "metric": metric, "mode": mode, "rows": rows,
           "varying": varying, "csv": str(csv_path), "png": str(png), "pareto_csv": str(pareto_csv), "best": None,
           "best_config": None, "best_config_yaml": "", "best_config_path": None}
    text = [f"sweep {name}: {len(rows)} runs ({sum(r['status'] == 'done' for r in rows)} done) in {runs_root}",
            format_table(rows, columns), f"CSV: {csv_path}", f"front ({y_key} vs compute): {pareto_csv}",
            f"plot: {png}"]
    if best_i is not None:
        cfg, text_yaml, best_path = write_best_config(runs[best_i], meta, name, path, out)
        res.update(best=rows[best_i], best_config=cfg, best_config_yaml=text_yaml, best_config_path=str(best_path))
        text += [f"best by {metric} ({mode}): {runs[best_i]['name']} = {fmt(rows[best_i][metric])}, test top-1 "
                 f"{fmt(rows[best_i].get('final_top1'))}; {_selection_note(meta, metric, rows)}",
                 f"its config ({best_path}, runs with `kcd-ray distill --config {best_path}`):", text_yaml.rstrip()]
    text += _best_per_budget(rows, runs, meta, name, path, out, metric, mode)
    res["text"] = "\n".join(text)
    return res
