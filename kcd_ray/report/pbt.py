"""The schedule a Population Based Training sweep found: the winning trial's T(epoch) and kept-fraction(epoch).

An exploited trial resumes another trial's checkpoint, whose metrics history travels with it, so the winner's
``metrics.jsonl`` is its whole lineage: the temperature and kept fraction each epoch actually trained with, and
``history.jsonl`` names each takeover and the config keys it changed. Written at the end of ``run_sweep`` as
``<sweep>/pbt_schedule.csv`` and ``pbt_schedule.png``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLUMNS = ("epoch", "T", "kept_fraction", "top1", "lr")


def schedule_rows(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return [{k: r.get(k) for k in COLUMNS} for r in rows]


def takeovers(run_dir: Path) -> list[dict]:
    """The resume records of a trial (PBT exploits): epoch and the changed keys."""
    f = Path(run_dir) / "history.jsonl"
    if not f.is_file():
        return []
    return [r for r in (json.loads(x) for x in f.read_text().splitlines() if x.strip()) if r.get("event") == "resume"]


def schedule_plot(rows: list[dict], path: Path, title: str) -> Path:
    fig = Figure(figsize=(7.5, 3.2))
    ax_t, ax_k = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    epochs = [r["epoch"] for r in rows]
    ax_t.step(epochs, [r["T"] for r in rows], where="post", color="tab:red")
    ax_t.set(xlabel="epoch", ylabel="temperature T", title="T(epoch)")
    ax_k.step(epochs, [r["kept_fraction"] for r in rows], where="post", color="tab:blue")
    ax_k.set(xlabel="epoch", ylabel="kept fraction", title="kept fraction(epoch)", ylim=(0, 1.05))
    fig.suptitle(title, fontsize=10)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_pbt_schedule(folder: Path, results, metric: str, mode: str = "max") -> Path | None:
    """CSV and PNG of the best trial's schedule (by its last ``metric``); None when no trial finished."""
    try:
        best = results.get_best_result(metric=metric, mode=mode, scope="last")
    except (RuntimeError, ValueError):
        return None
    run_dir = (best.metrics or {}).get("run_dir")
    if not run_dir or not (Path(run_dir) / "metrics.jsonl").is_file():
        return None
    rows = schedule_rows(Path(run_dir))
    folder = Path(folder)
    with open(folder / "pbt_schedule.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    n = len(takeovers(Path(run_dir)))
    png = schedule_plot(rows, folder / "pbt_schedule.png",
                        f"PBT winner {Path(run_dir).name}: {metric} {best.metrics.get(metric)}, {n} takeover(s)")
    print(f"[kcd_ray] PBT: the winning schedule ({Path(run_dir).name}) -> {folder / 'pbt_schedule.csv'}, {png}",
          flush=True)
    return png
