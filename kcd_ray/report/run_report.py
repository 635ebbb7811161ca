"""The report of one run folder: the per-epoch table, ``epochs.csv`` and ``curves.png``."""

from __future__ import annotations

from pathlib import Path

from kcd_ray.report.runs import load_run, variant
from kcd_ray.report.tables import fmt, format_table, write_csv

EPOCH_COLUMNS = ("epoch", "top1", "top5", "kept_fraction", "T", "stage", "train_loss", "lr", "epoch_seconds")


def run_report(path: Path, out: Path) -> dict:
    run = load_run(path)
    rows = [dict(m, epoch=m.get("epoch", i) + 1) for i, m in enumerate(run["metrics"])]  # 1-based for people
    columns = ([c for c in EPOCH_COLUMNS if any(c in r for r in rows)]
               + sorted({k for r in rows for k in r if k.startswith("loss_")}))
    out.mkdir(parents=True, exist_ok=True)
    all_cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    csv_path = write_csv(rows, all_cols, out / "epochs.csv")
    from kcd_ray.plots import curves_plot

    png = curves_plot(run["metrics"], out / "curves.png", f"{run['name']} ({variant(run)}, {run['status']})")
    s = run["summary"]
    text = [f"run {run['name']} ({variant(run)}, {run['status']}): {len(rows)} epochs", format_table(rows, columns)]
    if s:
        text.append("final top-1 {} | best top-1 {} (epoch {}) | compute ratio {} | wall {} s".format(
            fmt(s.get("final_top1")), fmt(s.get("best_top1")),
            fmt(None if s.get("best_epoch") is None else s["best_epoch"] + 1), fmt(s.get("compute_ratio")),
            fmt(s.get("wall_seconds"))))
    text += [f"CSV: {csv_path}", f"plot: {png}"]
    return {"kind": "run", "path": str(path), "rows": rows, "summary": s, "status": run["status"], "csv": str(csv_path),
            "png": str(png), "text": "\n".join(text)}
