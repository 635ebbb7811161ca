"""Teacher-output cache benchmarks. Three parts, each printing ratios measured in the same run:

    .venv/bin/python bench/teacher_cache.py throughput [--steps 30] [--threads 2]
    .venv/bin/python bench/teacher_cache.py sweep [--trials 4] [--epochs 3]
    .venv/bin/python bench/teacher_cache.py views [--seeds 0 1 2] [--ks 4 8 16] [--epochs 15] [--data synthetic digits]
    .venv/bin/python bench/teacher_cache.py blends [--epochs 18]

``throughput``: KD steps, resnet32x4 -> resnet8x4, batch 64, 32x32 CIFAR-shaped inputs, on the engine (the same
step a Train worker runs): the teacher in the loop against batches that carry the cached fp16 logits (what the Ray
Data pipeline joins). Interleaved rounds, median step time per arm; ratio = teacher-in-loop / cached.

``sweep``: a ``trials``-trial rho sweep (in-process trials on Ray Tune, KCD on, resnet32x4 -> resnet8x4 on a
synthetic 32x32 set), total wall time including the cache build, against the same sweep with ``distill.cache=off``.

``views``: views mode at K in ``--ks`` against ``exact`` (the student sees every epoch's own augmentation), KD
resnet20 -> resnet8 on the duplicate-heavy synthetic set and on digits, 3 seeds: last-epoch and best top-1
(mean +- standard error), sample-passes and the teacher forwards the cache costs (exact: epochs x N; views: K x N).
The views runs feed the engine the views-mode augmentation (``kcd_ray.cache.store.augment_uniforms``) with the
teacher in the loop, which computes exactly what the cache holds (``tests/test_teacher_cache.py`` checks that
equality on the Ray pipeline), so the comparison isolates the trade-off: K distinct views instead of one per epoch.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kcd_ray.cache.store import CacheSpec, augment_uniforms  # noqa: E402
from kcd_ray.config import load_config  # noqa: E402
from kcd_ray.data import iter_split, prepare_dataset  # noqa: E402
from kcd_ray.data import transforms as T  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_se  # noqa: E402
from kcd_ray.engine import Engine, LocalServices, assemble_engine  # noqa: E402
from kcd_ray.models import build_model, save_model  # noqa: E402

KD = {"method": "kd", "gamma": 0.1, "alpha": 0.9, "temperature": {"schedule": "constant", "T": 4.0}}


def engine_for(cfg, data_dir: str, folder: Path, kind="distill", teacher_cache=None) -> Engine:
    return assemble_engine(cfg, torch.device("cpu"), LocalServices(checkpoint_dir=folder / "ckpt"), kind=kind,
                           data_dir=data_dir, run_dir=folder, teacher_cache=teacher_cache)


# --------------------------------------------------------------------------- throughput


def throughput(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="kcd_tc_bench_"))
    torch.manual_seed(0)
    teacher = out / "resnet32x4.pt"
    save_model(teacher, build_model("resnet32x4", 100))
    base = {"model": "resnet8x4", "data": {"name": "synthetic", "root": str(out / "data"),
                                           "synthetic": {"num_train": 256, "num_test": 64, "num_classes": 100,
                                                         "image_size": 32}},
            "optim": {"batch_size": 64, "epochs": 1, "threads": args.threads},
            "distill": {**KD, "teacher": str(teacher)},
            "kcd": {"enabled": False}, "scaling": {"num_workers": 0}, "run": {"verbose": 0}}
    cfg = load_config(base=base)
    data_dir = str(prepare_dataset(cfg.data, verbose=False))
    live = engine_for(cfg, data_dir, out / "live")
    shapes = tuple(tuple(s) for s in live.distiller.t_shapes) or ((),)
    spec = CacheSpec(dir=str(out), mode="exact", views=0, topk=0, feat=False, seed=0, augment="cifar", epochs=1,
                     plain=False, teacher_shapes=shapes)
    cached = engine_for(cfg, data_dir, out / "cached", teacher_cache=spec)
    assert cached.distiller.teacher is None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (64,), generator=g)
    with torch.no_grad():
        z = live.distiller.teacher(x)
    b_live = {"image": x, "label": y, "sample_id": torch.arange(64)}
    b_cached = {**b_live, "t_logits": z.half()}
    times = {"teacher_in_loop": [], "cached": []}
    for e, b in ((live, b_live), (cached, b_cached)):
        for _ in range(3):  # warm-up
            e.step(b, 4.0, 0)
    for _ in range(args.steps):
        for name, e, b in (("teacher_in_loop", live, b_live), ("cached", cached, b_cached)):
            t0 = time.perf_counter()
            e.step(b, 4.0, 0)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"bench": "throughput", "threads": args.threads, "batch": 64, "steps": args.steps,
           "img_per_s_teacher_in_loop": 64 / med["teacher_in_loop"], "img_per_s_cached": 64 / med["cached"],
           "ratio": med["teacher_in_loop"] / med["cached"]}
    print(json.dumps(res), flush=True)
    return res


# --------------------------------------------------------------------------- sweep


def sweep(args) -> dict:
    from kcd_ray.ray_layer.tune.sweep import run_sweep

    out = Path(tempfile.mkdtemp(prefix="kcd_tc_sweep_"))
    torch.manual_seed(0)
    teacher = out / "resnet32x4.pt"
    save_model(teacher, build_model("resnet32x4", 10))
    base = {"model": "resnet8x4", "data": {"name": "synthetic", "root": str(out / "data"),
                                           "synthetic": {"num_train": args.samples, "num_test": 64, "num_classes": 10,
                                                         "image_size": 32}},
            "optim": {"batch_size": 64, "epochs": args.epochs, "lr": 0.05},
            "distill": {**KD, "teacher": str(teacher)},
            "kcd": {"enabled": True, "interval": 1, "stages": 2, "summary": False},
            "scaling": {"num_workers": 0, "cpus_per_worker": 1.0, "data_cpus": 0.25}, "run": {"verbose": 0}}
    rhos = [round(0.5 + 0.4 * i / max(args.trials - 1, 1), 3) for i in range(args.trials)]
    walls = {}
    for mode in ("off", "exact"):  # off first: the data set is prepared by then for both
        b = json.loads(json.dumps(base))
        b["distill"]["cache"] = mode
        t0 = time.perf_counter()
        run_sweep({"name": f"rho_{mode}", "base": b, "space": {"kcd.rho": rhos}, "search": "grid",
                   "storage_path": str(out / "sweeps")})
        walls[mode] = time.perf_counter() - t0
        print(f"sweep cache={mode}: {walls[mode]:.1f}s", flush=True)
    res = {"bench": "sweep", "trials": args.trials, "epochs": args.epochs, "samples": args.samples,
           "wall_off_s": walls["off"], "wall_exact_incl_build_s": walls["exact"],
           "ratio": walls["off"] / walls["exact"]}
    print(json.dumps(res), flush=True)
    return res


# --------------------------------------------------------------------------- views vs exact


def _split(data_dir, name):
    meta = T.read_meta(data_dir)
    rows = list(iter_split(data_dir, name))
    return {"ids": np.concatenate([b.column("sample_id").to_numpy() for b in rows]),
            "labels": np.concatenate([b.column("label").to_numpy() for b in rows]),
            "raw": T.decode_images([x for b in rows for x in b.column("image").to_pylist()], meta), "meta": meta}


def _feed(train, seed: int, bs: int, views: int):
    n_u = T.n_uniforms("cifar")

    def batches(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(train["ids"])
        for i in range(0, len(order), bs):
            j = order[i:i + bs]
            u = augment_uniforms(j, n_u, seed, epoch, views=views)
            yield {"image": T.train_transform(train["raw"][j], train["meta"], "cifar", uniforms=u),
                   "label": torch.as_tensor(train["labels"][j]), "sample_id": torch.as_tensor(j)}

    return batches


def _test_feed(test):
    bs = [{"image": T.eval_transform(test["raw"][i:i + 512], test["meta"]),
           "label": torch.as_tensor(test["labels"][i:i + 512]),
           "sample_id": torch.as_tensor(test["ids"][i:i + 512])} for i in range(0, len(test["ids"]), 512)]
    return lambda: iter(bs)


DATA = {"synthetic": {"name": "synthetic", "synthetic": {"num_train": 1200, "num_test": 600, "num_classes": 10,
                                                        "image_size": 16, "duplicate_fraction": 0.5}},
        "digits": {"name": "digits", "image_size": 16}}


def views(args) -> dict:
    torch.set_num_threads(1)
    out = Path(args.out)
    results = {}
    for dname in args.data:
        dcfg = {**DATA[dname], "root": str(out / "data")}
        base = {"data": dcfg, "optim": {"batch_size": 64, "lr": 0.05, "scheduler": "cosine", "threads": 1},
                "scaling": {"num_workers": 0}, "run": {"verbose": 0}, "kcd": {"enabled": False}}
        cfg0 = load_config(base={**base, "model": "resnet20",
                                 "optim": {**base["optim"], "epochs": args.teacher_epochs}})
        data_dir = str(prepare_dataset(cfg0.data, verbose=False))
        train, test = _split(data_dir, "train"), _split(data_dir, "test")
        tfile = out / dname / "teacher" / "final_model.pt"
        if not tfile.exists():
            e = engine_for(cfg0, data_dir, tfile.parent, kind="teacher")
            s = e.run(_feed(train, 100, 64, 0), _test_feed(test))
            print(f"{dname} teacher resnet20: top1 {s['final_top1']:.2f}", flush=True)
        n = len(train["ids"])
        for mode in ["exact", *[f"views{k}" for k in args.ks]]:
            k = 0 if mode == "exact" else int(mode[5:])
            last, best, passes = [], [], []
            for seed in args.seeds:
                cfg = load_config(base={**base, "model": "resnet8", "optim": {**base["optim"], "epochs": args.epochs,
                                                                             "seed": seed},
                                        "distill": {**KD, "teacher": str(tfile)}})
                e = engine_for(cfg, data_dir, out / dname / mode / f"s{seed}")
                s = e.run(_feed(train, seed, 64, k), _test_feed(test))
                last.append(s["final_top1"])
                best.append(s["best_top1"])
                passes.append(s["sample_passes"])
            (m, se), (bm, bse) = mean_se(last), mean_se(best)
            results[f"{dname}/{mode}"] = {"top1_last": m, "se": se, "top1_best": bm, "best_se": bse,
                                          "sample_passes": float(np.mean(passes)),
                                          "cache_teacher_forwards": (k or args.epochs) * n, "seeds": len(args.seeds)}
            print(f"{dname:9s} {mode:8s} last {m:6.2f} +- {se:4.2f}  best {bm:6.2f} +- {bse:4.2f}  "
                  f"sample-passes {np.mean(passes):.0f}  cache teacher forwards {(k or args.epochs) * n}", flush=True)
    (out / "views.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "views.json").write_text(json.dumps(results, indent=1))
    return results


# --------------------------------------------------------------------------- KCD blends with a cache


def blends(args) -> dict:
    """KCD (the digits recipe: rho 0.7, 6 stages of 3 epochs, summary blends) with the cache: the blended rows are
    the only teacher forwards left; their share of the trained rows, and the wall time against the teacher in the
    loop (a real in-process ``fit`` on Ray Data)."""
    from kcd_ray.ray_layer.trainer import fit

    out = Path(args.out)
    teacher = out / "digits" / "teacher" / "final_model.pt"
    if not teacher.exists():
        raise SystemExit(f"{teacher}: run the views part first (it trains the digits teacher)")
    res = {}
    for mode in ("off", "exact"):
        cfg = load_config("experiments/digits/kcd.yaml", [
            f"distill.teacher={teacher}", f"distill.cache={mode}", f"optim.epochs={args.epochs}",
            "kcd.interval=3", "scaling.num_workers=0", "optim.threads=2", f"data.root={out / 'data'}",
            "data.val_fraction=0",  # the recorded figure trained on all 1,347 images (before the recipe's split)
            f"run.storage_path={out / 'blends'}", f"run.name=kcd_{mode}", "run.resume=never", "run.verbose=0"])
        t0 = time.perf_counter()
        s = fit(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        trained = sum(r["samples_seen"] for r in rows)
        teacher_rows = sum(r["teacher_forward_samples"] for r in rows)
        res[mode] = {"wall_s": wall, "final_top1": s["final_top1"], "samples_trained": trained,
                     "teacher_forward_samples": teacher_rows, "teacher_share": teacher_rows / trained}
        print(f"KCD cache={mode}: {wall:.1f}s, top1 {s['final_top1']:.2f}, teacher forwards {teacher_rows} for "
              f"{trained} trained rows ({100 * teacher_rows / trained:.1f}%)", flush=True)
    res["ratio"] = res["off"]["wall_s"] / res["exact"]["wall_s"]
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("sweep")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=512)
    p = sub.add_parser("views")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--data", nargs="+", default=["synthetic", "digits"])
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_tcache"))
    p = sub.add_parser("blends")
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_tcache"))
    args = ap.parse_args(argv)
    {"throughput": throughput, "sweep": sweep, "views": views, "blends": blends}[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
