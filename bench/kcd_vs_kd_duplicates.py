"""KCD against plain KD on a synthetic set padded with near-duplicate easy samples (the redundancy KCD exploits).

Trains a teacher, then the same student with KD and with KD+KCD (same epochs, same seed), and reports:
top-1 of both, KCD's sample-passes as a fraction of KD's, and what KCD dropped (share of duplicates among the
dropped samples against their share of the data set).

    .venv/bin/python bench/kcd_vs_kd_duplicates.py                      # one seed, ~3 min on 2 cores
    .venv/bin/python bench/kcd_vs_kd_duplicates.py --seeds 0 1 2 3 4    # the recorded figure, ~11 min
    .venv/bin/python bench/kcd_vs_kd_duplicates.py --workdir W --kcd kcd.mode=single   # a variant; W reuses teacher+KD
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcd_ray.config import load_config  # noqa: E402
from kcd_ray.data import prepare_dataset  # noqa: E402


def _tag(overrides: list[str]) -> str:
    return "_".join(o.replace("kcd.", "").replace("=", "") for o in overrides) or "default"


def cfg_for(work: Path, args, seed: int, extra: list[str] = (), **over):
    d = {
        "model": args.student,
        "data": {"name": "synthetic", "root": str(work / "data"),
                 "synthetic": {"num_train": args.num_train, "num_test": args.num_test, "num_classes": 10,
                               "image_size": 16, "duplicate_fraction": args.duplicates, "seed": 0}},
        "optim": {"epochs": args.epochs, "batch_size": 64, "lr": 0.05, "scheduler": "cosine", "seed": seed,
                  "threads": 2},
        "scaling": {"num_workers": 0},
        "run": {"storage_path": str(work / "runs"), "verbose": 0},
        "kcd": {"interval": args.epochs // 4, "stages": 3, "rho": args.rho, "seed": seed},
    }
    return load_config(base=d, overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()] + list(extra))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--num-test", type=int, default=4000, help="large enough that one image is 0.025 points")
    ap.add_argument("--duplicates", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--teacher", default="resnet20")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--workdir", default=None,
                    help="reuse a folder: the teacher and data set are trained/prepared once")
    ap.add_argument("--kcd", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra overrides for the KCD run only, e.g. kcd.estep=offline kcd.mode=single")
    args = ap.parse_args()
    from kcd_ray.ray_layer.trainer import fit

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kcd_dups_"))
    t = fit(cfg_for(work, args, 0, model=args.teacher, **{"run.name": "teacher", "optim.epochs": 15}), kind="teacher")
    teacher = str(Path(t["run_dir"]) / "final_model.pt")
    data_dir = prepare_dataset(cfg_for(work, args, 0).data, verbose=False)
    dup = pq.read_table(Path(data_dir) / "train", columns=["sample_id", "is_duplicate"]).to_pydict()
    is_dup = np.zeros(len(dup["sample_id"]), bool)
    is_dup[np.asarray(dup["sample_id"])] = np.asarray(dup["is_duplicate"]).astype(bool)

    res = {"kd": [], "kcd": [], "passes": [], "dup_share": []}
    for seed in args.seeds:
        kd = fit(cfg_for(work, args, seed, **{"run.name": f"kd{seed}", "kcd.enabled": False,
                                              "distill.teacher": teacher}), kind="distill")
        kcd = fit(cfg_for(work, args, seed, args.kcd, **{"run.name": f"kcd{seed}_{_tag(args.kcd)}",
                                                          "distill.teacher": teacher}), kind="distill")
        mask = pq.read_table(Path(kcd["run_dir"]) / "masks" / "mask_final.parquet").to_pydict()
        dropped = np.asarray(mask["sample_id"])[~np.asarray(mask["kept"])]
        res["kd"].append(kd["final_top1"])
        res["kcd"].append(kcd["final_top1"])
        res["passes"].append(kcd["sample_passes"] / kd["sample_passes"])
        res["dup_share"].append(float(is_dup[dropped].mean()) if len(dropped) else float("nan"))
        print(f"seed {seed}: teacher {t['final_top1']:.2f} | KD {kd['final_top1']:.2f} | KCD {kcd['final_top1']:.2f} | "
              f"KCD passes / KD passes {res['passes'][-1]:.3f} | "
              f"duplicates among dropped {100 * res['dup_share'][-1]:.1f}% "
              f"(data set: {100 * is_dup.mean():.1f}%)")
    m = {k: statistics.mean(v) for k, v in res.items()}
    diffs = [b - a for a, b in zip(res["kd"], res["kcd"])]
    # Same seed = same init and data order until the first condensation: compare per seed (paired).
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    print(f"mean over {len(args.seeds)} seed(s): KD {m['kd']:.2f}, KCD {m['kcd']:.2f} "
          f"(KCD - KD {m['kcd'] - m['kd']:+.2f} +- {se:.2f} s.e. of the paired difference), "
          f"sample-passes ratio {m['passes']:.3f} (target <= 0.8), "
          f"duplicates among dropped {100 * m['dup_share']:.1f}%")


if __name__ == "__main__":
    main()
