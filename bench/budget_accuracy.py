"""How closely a run lands on its ``selection.budget``: the compute ratio the ledger counts against the budget asked.

    .venv/bin/python bench/budget_accuracy.py [--data digits synthetic] [--budgets 0.65 0.75 0.9] [--epochs 12]
                                              [--out runs/bench_budget]

For each data set (digits at 16x16 with a validation split; the duplicate-heavy synthetic set, 1,200 train), each
strategy (kcd, random, infobatch, unixkd) and each budget, one run through ``fit`` (in this process on the embedded
local Ray, ``scaling.num_workers=0``): resnet8 student, a resnet20 teacher trained here once per data set (15
epochs; InfoBatch's saving depends on the losses a real teacher gives), KD, SGD batch 64, ``--epochs`` epochs (KCD
condenses every epoch in 3 stages). A budget a strategy cannot reach is listed with the reason. Printed per run: the
value the budget set, the planned ratio, the achieved ratio and achieved - budget; per strategy, the largest
|achieved - budget|. kcd and random are deterministic (their sizes are planned exactly); InfoBatch's saving depends
on how many losses fall below the mean (planned: half), and UNIXKD's on nothing but its ratio and the ranking
forwards. Finished runs are read back on a rerun.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cached_result, md_table  # noqa: E402

DATA = {"digits": {"name": "digits", "image_size": 16, "val_fraction": 0.2},
        "synthetic": {"name": "synthetic", "synthetic": {"num_train": 1200, "num_test": 300, "num_classes": 10,
                                                         "image_size": 16, "duplicate_fraction": 0.5}}}
STRATEGIES = ("kcd", "random", "infobatch", "unixkd")


def base_config(out: Path, data: str, epochs: int, teacher: str) -> dict:
    return {"model": "resnet8", "data": {**DATA[data], "root": str(out / "data")},
            "optim": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "scheduler": "cosine", "threads": 2},
            "distill": {"method": "kd", "teacher": teacher}, "kcd": {"interval": 1, "stages": 3},
            "scaling": {"num_workers": 0, "cpus_per_worker": 2.0, "data_cpus": 0.25},
            "run": {"verbose": 0, "storage_path": str(out / "runs")}}


def train_teacher(out: Path, data: str) -> str:
    from kcd_ray.config import load_config
    from kcd_ray.ray_layer.trainer import fit

    path = out / "runs" / f"{data}-teacher" / "final_model.pt"
    if not path.is_file():
        cfg = base_config(out, data, 15, "")
        cfg.pop("distill"), cfg.pop("kcd")
        cfg["model"], cfg["run"]["name"] = "resnet20", f"{data}-teacher"
        fit(load_config(base=cfg), kind="teacher")
    return str(path)


def one_run(out: Path, data: str, strategy: str, budget: float, epochs: int, teacher: str) -> dict:
    from kcd_ray.config import ConfigError, load_config
    from kcd_ray.ray_layer.trainer import fit

    cfg = base_config(out, data, epochs, teacher)
    cfg["selection"] = {"strategy": strategy, "budget": budget}
    cfg["run"]["name"] = f"{data}-{strategy}-{budget:g}-e{epochs}"
    try:
        s = fit(load_config(base=cfg))
    except ConfigError as e:
        if not str(e).startswith("selection.budget"):
            raise
        return {"unreachable": str(e)}
    return {"resolved": s["budget_resolved"], "planned": s["planned_compute_ratio"], "achieved": s["compute_ratio"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.75, 0.9])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default="runs/bench_budget")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    rows, worst = [], {}
    for data in args.data:
        teacher = train_teacher(out, data)
        for strategy in STRATEGIES:
            for b in args.budgets:
                r = cached_result(out / "results" / f"{data}-{strategy}-{b:g}-e{args.epochs}.json",
                                  partial(one_run, out, data, strategy, b, args.epochs, teacher))
                if "unreachable" in r:
                    rows.append([data, strategy, f"{b:g}", "unreachable", "", "", r["unreachable"][:90]])
                    continue
                gap = r["achieved"] - b
                worst[strategy] = max(worst.get(strategy, 0.0), abs(gap))
                rows.append([data, strategy, f"{b:g}", ", ".join(f"{k}={v:g}" for k, v in r["resolved"].items()),
                             f"{r['planned']:.3f}", f"{r['achieved']:.3f}", f"{gap:+.3f}"])
                print(f"[budget] {data} {strategy} {b:g}: achieved {r['achieved']:.3f} ({gap:+.3f})", flush=True)
    lines = md_table(["data", "strategy", "budget", "set", "planned", "achieved", "achieved - budget"], rows)
    lines += ["", "largest |achieved - budget| per strategy: " +
              ", ".join(f"{s} {w:.3f}" for s, w in worst.items())]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
