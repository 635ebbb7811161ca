"""Data-efficient distillation arena: data-selection strategies against plain KD under one compute ledger.

    .venv/bin/python bench/arena.py [--seeds 0 1 2] [--epochs 15] [--data synthetic digits] [--out runs/bench_arena]
                                    [--points kd kcd0.3 ib0.5 ...] [--kcd-interval 1] [--kcd-stages 6]

Protocol. Two data sets, each with one resnet20 teacher trained once and reused (``runs/bench_tcache/<data>/teacher``
from ``bench/teacher_cache.py views``; trained here, 20 epochs, when the file is missing):

- ``synthetic``: the duplicate-heavy synthetic set (1,200 train / 600 test, 10 classes, 16x16, half of the training
  samples near-copies of a few easy prototypes);
- ``digits``: scikit-learn's digits at 16x16 (1,347 train / 450 test).

Student resnet8, KD (gamma 0.1, alpha 0.9, constant T = 4), SGD batch 64, lr 0.05, cosine, ``--epochs`` epochs, one
torch thread, seeds ``--seeds``. Every run is the engine (``kcd_ray.engine``: the components, hooks and compute ledger
a Ray Train worker runs) in this process, fed by plain Python batches: each epoch serves the selection the engine
published (``engine.services.mask``: KCD's kept set and its blend overlay, InfoBatch's or random's per-epoch kept
set), shuffled by (seed, epoch), with the pipeline's CIFAR-style augmentation (``transforms.train_transform``) from a
(seed, epoch) generator. Batches hold ``selection.feed_batch_size(cfg)`` rows (UNIXKD: its candidate batch). KCD's
blend overlay is applied as the Ray Data pipeline applies it (a kept row with an overlay image gets that image).

Points (``selection.strategy``; the point names ``--points`` takes in brackets): ``kd`` (none: plain KD);
``kcd`` at rho 0.3/0.5/0.7 (``kcd-<rho>``; online E-step, entropy values, VAKS summary blends; ``--kcd-interval`` /
``--kcd-stages``, by default condensing every epoch from epoch 1 in 6 steps, so the floor rho N is reached at epoch 6
and condensation saves compute within 15 epochs); ``kcd-every2`` the same rhos every 2 epochs in 6 steps (floor at
epoch 12; ``kcd-every2-<rho>``); InfoBatch at prune ratio 0.3/0.5/0.7 (delta 0.875; ``infobatch-<r>``); UNIXKD at
ratio 0.75 (the reference: train on 48 of each 64-row candidate batch) and 0.5 (``unixkd-<r>``); random subsets at
fraction 0.3/0.5/0.7, redrawn every epoch (``random-<f>``); and random subsets at KCD's sizes for rho 0.3
(``random-kcdsched-0.3``, ``selection.random.follow_kcd_schedule``): KCD's compute with random samples.

Reported per data set and point: compute ratio (the ledger's FLOPs against plain KD: student forward+backward and
teacher forward of trained rows, plus UNIXKD's ranking forwards; mean over seeds), sample-pass ratio, last-epoch and
best-epoch top-1 (mean +- standard error over seeds), wall seconds. Headline per strategy: the smallest compute ratio
at which its mean top-1 is >= KD's mean minus KD's standard error ("within one SE of KD or above"). Written: one JSON
of every run and aggregate (``<out>/arena.json``), one Pareto plot per data set (``<out>/pareto_<data>.png``), and
the tables on stdout (Markdown). Finished runs are reused on a rerun (``bench_summary.json`` per run, matched on
its point and epochs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kcd_ray.config import load_config  # noqa: E402
from kcd_ray.data import iter_split, prepare_dataset  # noqa: E402
from kcd_ray.data import transforms as T  # noqa: E402
from kcd_ray.data.blend import overlay_lookup  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_se  # noqa: E402
from kcd_ray.engine import Engine, assemble_engine  # noqa: E402
from kcd_ray.engine.selection import feed_batch_size  # noqa: E402
from kcd_ray.models import load_model  # noqa: E402

KD = {"method": "kd", "gamma": 0.1, "alpha": 0.9, "temperature": {"schedule": "constant", "T": 4.0}}
OPTIM = {"batch_size": 64, "lr": 0.05, "scheduler": "cosine", "eval_batch_size": 512, "threads": 1}
DATA = {"synthetic": {"name": "synthetic", "synthetic": {"num_train": 1200, "num_test": 600, "num_classes": 10,
                                                        "image_size": 16, "duplicate_fraction": 0.5}},
        "digits": {"name": "digits", "image_size": 16}}
COLOURS = {"KD": "black", "kcd": "tab:red", "kcd-every2": "tab:orange", "infobatch": "tab:blue", "unixkd": "tab:green",
           "random": "tab:gray", "random-kcd-schedule": "tab:purple"}


def points(kcd_interval: int, kcd_stages: int) -> dict:
    """name -> (family, setting, config sections); the family is the strategy (or a variant of it) in tables/plots."""
    p = {"kd": ("KD", "-", {"selection": {"strategy": "none"}})}
    kcd = {"kcd": (kcd_interval, kcd_stages), "kcd-every2": (2, 6)}
    for fam, (iv, st) in kcd.items():
        for r in (0.3, 0.5, 0.7):
            p[f"{fam}-{r}"] = (fam, f"rho {r} (every {iv}, {st} stages)",
                               {"selection": {"strategy": "kcd"},
                                "kcd": {"enabled": True, "rho": r, "interval": iv, "stages": st}})
    for r in (0.3, 0.5, 0.7):
        p[f"infobatch-{r}"] = ("infobatch", f"ratio {r}",
                               {"selection": {"strategy": "infobatch", "infobatch": {"ratio": r}}})
    for r in (0.75, 0.5):
        p[f"unixkd-{r}"] = ("unixkd", f"ratio {r}", {"selection": {"strategy": "unixkd", "unixkd": {"ratio": r}}})
    for f in (0.3, 0.5, 0.7):
        p[f"random-{f}"] = ("random", f"fraction {f}",
                            {"selection": {"strategy": "random", "random": {"fraction": f}}})
    p["random-kcdsched-0.3"] = ("random-kcd-schedule", f"KCD's sizes, rho 0.3 (every {kcd_interval}, {kcd_stages} stages)",
                                {"selection": {"strategy": "random", "random": {"follow_kcd_schedule": True}},
                                 "kcd": {"rho": 0.3, "interval": kcd_interval, "stages": kcd_stages}})
    return p


# --------------------------------------------------------------------------- data and feeds


def load_split(data_dir, name):
    meta = T.read_meta(data_dir)
    rows = list(iter_split(data_dir, name))
    return {"ids": np.concatenate([b.column("sample_id").to_numpy() for b in rows]),
            "labels": np.concatenate([b.column("label").to_numpy() for b in rows]),
            "raw": T.decode_images([x for b in rows for x in b.column("image").to_pylist()], meta), "meta": meta}


class Feed:
    """Train batches of the published selection (kept ids + blend overlay), shuffled by (seed, epoch), augmented."""

    def __init__(self, train, seed: int, batch_size: int):
        self.train, self.seed, self.bs = train, seed, batch_size
        self.engine = None

    def __call__(self, epoch):
        kept, overlay = self.engine.services.mask
        ids = self.train["ids"] if kept is None else np.asarray(kept)
        order = np.random.default_rng([self.seed, epoch & 0x7FFFFFFF]).permutation(ids)
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        for i in range(0, len(order), self.bs):
            j = order[i:i + self.bs]
            raw = self.train["raw"][j]
            if overlay:  # KCD's summary blends, as the pipeline serves them
                hit, over = overlay_lookup(overlay, j)
                if hit.any():
                    raw = raw.copy()
                    raw[hit] = over
            x = T.train_transform(raw, self.train["meta"], "cifar", gen)
            yield {"image": x, "label": torch.as_tensor(self.train["labels"][j]), "sample_id": torch.as_tensor(j)}


def test_feed(test):
    bs = [{"image": T.eval_transform(test["raw"][i:i + 512], test["meta"]),
           "label": torch.as_tensor(test["labels"][i:i + 512]), "sample_id": torch.as_tensor(test["ids"][i:i + 512])}
          for i in range(0, len(test["ids"]), 512)]
    return lambda: iter(bs)


def engine_for(cfg, data_dir: str, folder: Path, kind="distill") -> Engine:
    return assemble_engine(cfg, torch.device("cpu"), kind=kind, data_dir=data_dir, run_dir=folder)


def run_one(cfg, data_dir, train, test, folder: Path, seed: int, kind="distill") -> dict:
    if folder.exists():  # an unfinished or stale run: start afresh (metrics, masks, blends)
        shutil.rmtree(folder)
    engine = engine_for(cfg, data_dir, folder, kind)
    feed = Feed(train, seed, feed_batch_size(cfg, kind))
    feed.engine = engine
    t0 = time.perf_counter()
    summary = engine.run(feed, test_feed(test))
    summary["bench_wall_seconds"] = time.perf_counter() - t0
    summary["kept_fraction_per_epoch"] = [r.get("kept_fraction") for r in engine.history]
    summary["top1_per_epoch"] = [r.get("top1") for r in engine.history]
    return summary


def teacher_top1(path, test) -> float:
    net = load_model(path).eval()
    with torch.no_grad():
        hits = sum(int((net(b["image"]).argmax(1) == b["label"]).sum()) for b in test_feed(test)())
    return 100.0 * hits / len(test["ids"])


# --------------------------------------------------------------------------- aggregation


def aggregate(runs: list) -> dict:
    (m, se), (bm, bse) = mean_se([r["final_top1"] for r in runs]), mean_se([r["best_top1"] for r in runs])
    return {"top1_last": m, "top1_last_se": se, "top1_best": bm, "top1_best_se": bse,
            "compute_ratio": float(np.mean([r["compute_ratio"] for r in runs])),
            "sample_pass_ratio": float(np.mean([r["sample_pass_ratio"] for r in runs])),
            "sample_passes": float(np.mean([r["sample_passes"] for r in runs])),
            "student_forward_only_passes": float(np.mean([r.get("student_forward_only_passes", 0) for r in runs])),
            "wall_seconds": float(np.mean([r["bench_wall_seconds"] for r in runs])), "seeds": len(runs)}


def headline(agg: dict, meta: dict, key: str) -> dict:
    """family -> (smallest compute ratio with mean top-1 >= KD mean - KD SE, its point), or None."""
    kd = agg["kd"]
    bar = kd[key] - kd[key + "_se"]
    out = {}
    for name, a in agg.items():
        s = meta[name][0]
        if s == "KD":
            continue
        if a[key] >= bar and (out.get(s) is None or a["compute_ratio"] < out[s][0]):
            out[s] = (a["compute_ratio"], name)
        out.setdefault(s, None)
    return out


def plot(dname: str, agg: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, title in ((axes[0], "top1_last", "last-epoch top-1"), (axes[1], "top1_best", "best-epoch top-1")):
        by: dict = {}
        for name, a in agg.items():
            by.setdefault(meta[name][0], []).append((a["compute_ratio"], a[key], a[key + "_se"]))
        for s, pts in by.items():
            pts.sort()
            xs, ys, es = zip(*pts)
            if s == "KD":
                ax.errorbar(xs, ys, yerr=es, fmt="*", ms=14, color=COLOURS[s], capsize=3, label="KD")
                ax.axhline(ys[0], color="black", lw=0.6, ls=":")
                ax.axhspan(ys[0] - es[0], ys[0] + es[0], color="black", alpha=0.07)
            else:
                ax.errorbar(xs, ys, yerr=es, fmt="o-", color=COLOURS[s], capsize=3, label=s)
        ax.set_xlabel("compute ratio (FLOPs / plain KD)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{dname}: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(dname: str, agg: dict, meta: dict) -> list[str]:
    lines = [f"{dname}:", "", "| strategy | setting | compute ratio | sample-pass ratio | last-epoch top-1 | best top-1 "
             "| wall s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in agg.items():
        s, setting, _ = meta[name]
        lines.append(f"| {s} | {setting} | {a['compute_ratio']:.3f} | "
                     f"{a['sample_pass_ratio']:.3f} | {a['top1_last']:.2f} +- {a['top1_last_se']:.2f} | "
                     f"{a['top1_best']:.2f} +- {a['top1_best_se']:.2f} | {a['wall_seconds']:.1f} |")
    for key, label in (("top1_last", "last-epoch"), ("top1_best", "best-epoch")):
        kd = agg["kd"]
        h = headline(agg, meta, key)
        parts = [f"{s} {v[0]:.3f} ({meta[v[1]][1]})" if v else f"{s} none of its points" for s, v in h.items()]
        lines.append("")
        lines.append(f"headline ({label} top-1 >= KD {kd[key]:.2f} - {kd[key + '_se']:.2f}): smallest compute ratio: "
                     + "; ".join(parts))
    return lines


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--data", nargs="+", default=["synthetic", "digits"], choices=sorted(DATA))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_arena"))
    ap.add_argument("--points", nargs="+", default=None, help="subset of the points (default: all)")
    ap.add_argument("--kcd-interval", type=int, default=1)
    ap.add_argument("--kcd-stages", type=int, default=6)
    ap.add_argument("--teacher-root", default=str(ROOT / "runs" / "bench_tcache"),
                    help="teachers at <root>/<data>/teacher/final_model.pt (trained there when missing)")
    ap.add_argument("--teacher-epochs", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = points(args.kcd_interval, args.kcd_stages)
    names = args.points or list(meta)
    if "kd" not in names:
        names = ["kd", *names]
    unknown = [n for n in names if n not in meta]
    if unknown:
        ap.error(f"unknown points {unknown}; known: {list(meta)}")
    results = {"command": " ".join(sys.argv), "epochs": args.epochs, "seeds": args.seeds,
               "kcd_interval": args.kcd_interval, "kcd_stages": args.kcd_stages, "data": {}}
    t_all = time.perf_counter()
    tables = []
    for dname in args.data:
        base = {"model": "resnet8", "data": {**DATA[dname], "root": str(out / "data")},
                "optim": {**OPTIM, "epochs": args.epochs}, "scaling": {"num_workers": 0},
                "run": {"verbose": 0, "checkpoints_to_keep": 1}, "kcd": {"enabled": False}}
        data_dir = str(prepare_dataset(load_config(base=base).data, verbose=False))
        train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
        tfile = Path(args.teacher_root) / dname / "teacher" / "final_model.pt"
        if not tfile.exists():
            cfg = load_config(base={**base, "model": "resnet20", "optim": {**base["optim"],
                                                                           "epochs": args.teacher_epochs}})
            s = run_one(cfg, data_dir, train, test, tfile.parent, 100, kind="teacher")
            print(f"{dname}: trained teacher resnet20 x {args.teacher_epochs}: top1 {s['final_top1']:.2f}", flush=True)
        t_top1 = teacher_top1(tfile, test)
        print(f"{dname}: {len(train['ids'])} train / {len(test['ids'])} test; teacher {tfile} top1 {t_top1:.2f}",
              flush=True)
        runs: dict = {}
        for name in names:
            strategy, setting, sections = meta[name]
            tag = {"point": name, "sections": sections, "epochs": args.epochs}
            for seed in args.seeds:
                folder = out / dname / name / f"s{seed}"
                done = folder / "bench_summary.json"
                s = json.loads(done.read_text()) if done.exists() else None
                if s is None or s.get("arena") != tag:
                    over = {k: {**base.get(k, {}), **v} for k, v in sections.items()}
                    cfg = load_config(base={**base, **over, "optim": {**base["optim"], "seed": seed},
                                            "distill": {**KD, "teacher": str(tfile)}})
                    s = run_one(cfg, data_dir, train, test, folder, seed)
                    s["arena"] = tag
                    done.write_text(json.dumps(s, default=str))
                    tail = f"{s['bench_wall_seconds']:.1f}s"
                else:
                    tail = "reused"
                runs.setdefault(name, []).append(s)
                print(f"{dname:9s} {name:10s} seed {seed}: top1 last {s['final_top1']:6.2f} best {s['best_top1']:6.2f}"
                      f"  compute {s['compute_ratio']:.3f}  passes {s['sample_pass_ratio']:.3f}  {tail}"
                      f"  [{time.perf_counter() - t_all:.0f}s total]", flush=True)
        agg = {n: aggregate(rs) for n, rs in runs.items()}
        plot(dname, agg, meta, out / f"pareto_{dname}.png")
        keep = ("final_top1", "best_top1", "best_epoch", "compute_ratio", "sample_pass_ratio", "sample_passes",
                "student_forward_only_passes", "teacher_forward_passes", "flops_total", "full_flops",
                "flops_student_forward", "flops_student_backward", "flops_teacher_forward", "bench_wall_seconds",
                "kept_fraction_per_epoch", "top1_per_epoch")
        results["data"][dname] = {
            "teacher": str(tfile), "teacher_top1": t_top1, "num_train": len(train["ids"]), "num_test": len(test["ids"]),
            "points": {n: {"strategy": meta[n][0], "setting": meta[n][1], "config": meta[n][2], **agg[n],
                           "runs": [{"seed": sd, **{k: r.get(k) for k in keep}}
                                                           for sd, r in zip(args.seeds, runs[n])]} for n in agg},
            "headline_last": {s: v for s, v in headline(agg, meta, "top1_last").items()},
            "headline_best": {s: v for s, v in headline(agg, meta, "top1_best").items()},
        }
        tables += table(dname, agg, meta) + [""]
    results["total_wall_seconds"] = time.perf_counter() - t_all
    (out / "arena.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print("\n".join(tables))
    print(f"total wall {results['total_wall_seconds']:.0f}s; JSON {out / 'arena.json'}; plots {out}/pareto_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
