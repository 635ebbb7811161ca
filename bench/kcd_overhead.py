"""KCD's own cost: the online E-step + mask application as a share of epoch time, and the offline E-step's
throughput against a plain PyTorch inference loop over the same data.

    .venv/bin/python bench/kcd_overhead.py                 # both measurements
    .venv/bin/python bench/kcd_overhead.py --only online   # or --only offline

Online: the same distillation (1 Train worker) with KCD off (plain KD) and on with rho=1 (mask served, values
recorded and gathered, condensation every epoch, nothing dropped), steady-state epochs only. Reports the in-loop
E-step/M-step seconds as a share of epoch time and the A/B difference of epoch times.
Offline: `kcd_ray.ray_layer.scoring.offline_scores` (Ray Data, actor pool) against a torch loop that reads the same
Parquet, decodes, normalises, runs the student and the value function.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcd_ray.config import load_config  # noqa: E402
from kcd_ray.data import load_meta, prepare_dataset  # noqa: E402
from kcd_ray.data import transforms as T  # noqa: E402
from kcd_ray.data.parquet_io import iter_split  # noqa: E402
from kcd_ray.models import build_model, save_model  # noqa: E402


def base_cfg(work: Path, args, **over):
    d = {
        "model": args.student,
        "data": {"name": "synthetic", "root": str(work / "data"),
                 "synthetic": {"num_train": args.num_train, "num_test": 256, "num_classes": 10, "image_size": 32}},
        "optim": {"epochs": args.epochs, "batch_size": 64, "threads": args.threads, "scheduler": "constant"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1.0, "data_cpus": 0.25},
        "run": {"storage_path": str(work / "runs"), "verbose": 0},
        "distill": {"teacher": str(work / "teacher.pt")},
        "kcd": {"interval": 1, "rho": 1.0, "stages": 6},
    }
    return load_config(base=d, overrides=[f"{k}={json.dumps(v)}" for k, v in over.items()])


def online(work: Path, args) -> None:
    from kcd_ray.ray_layer.trainer import fit

    rows = {}
    for name, enabled in (("kd", False), ("kcd", True)):
        s = fit(base_cfg(work, args, **{"run.name": name, "kcd.enabled": enabled}), kind="distill")
        rows[name] = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()][1:]
    kd_t = statistics.median(m["train_seconds"] for m in rows["kd"])
    kcd_t = statistics.median(m["train_seconds"] for m in rows["kcd"])
    inloop = statistics.median((m["estep_seconds"] + m["mstep_seconds"]) / m["epoch_seconds"] for m in rows["kcd"])
    print(f"online E-step + M-step, measured inside the loop: {100 * inloop:.2f}% of epoch time (target <= 3%)")
    print(f"A/B train seconds per epoch (median of {len(rows['kd'])}): KD {kd_t:.2f}s, KCD rho=1 {kcd_t:.2f}s, "
          f"difference {100 * (kcd_t - kd_t) / kd_t:+.2f}%")


def offline(work: Path, args) -> None:
    import ray

    from kcd_ray.ray_layer import compat
    from kcd_ray.ray_layer.scoring import offline_scores
    from kcd_ray.condense.values import VALUE_FNS, make_context

    cfg = base_cfg(work, args, **{"kcd.estep": "offline", "kcd.offline_actors": 1})
    data_dir = prepare_dataset(cfg.data, verbose=False)
    meta = load_meta(data_dir)
    student = build_model(args.student, 10).eval()
    torch.set_num_threads(args.threads)
    fn = VALUE_FNS.get("entropy")
    # Baseline: read the same Parquet, decode, normalise, forward, score.
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for rb in iter_split(data_dir, "train", batch_size=cfg.kcd.offline_batch_size):
            d = rb.to_pydict()
            x = T.eval_transform(T.decode_images(list(d["image"]), meta), meta)
            fn(student(x), None, torch.as_tensor(d["label"]), make_context(np.asarray(d["sample_id"]), 0, 0, 1.0))
            n += len(d["label"])
    base = n / (time.perf_counter() - t0)
    if not ray.is_initialized():
        compat.start_local_ray(2)  # as kcd_ray's own local Ray (trainer.init_ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ids, _vals = offline_scores(str(data_dir), cfg, student.state_dict(), epoch=0)
        rates.append(len(ids) / (time.perf_counter() - t0))
        assert len(ids) == n and np.array_equal(ids, np.arange(n))
    ours = max(rates)
    print(f"offline E-step over {n} samples: plain PyTorch {base:.0f} img/s, Ray Data actor pool {ours:.0f} img/s "
          f"(best of {args.repeats}: {[round(r) for r in rates]}), ratio {ours / base:.3f} (target >= 0.9)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("online", "offline"))
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--teacher", default="resnet8x4")
    ap.add_argument("--num-train", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kcd_overhead_"))
    save_model(work / "teacher.pt", build_model(args.teacher, 10))  # untrained is fine: cost, not accuracy
    if args.only in (None, "online"):
        online(work, args)
    if args.only in (None, "offline"):
        offline(work, args)


if __name__ == "__main__":
    main()
