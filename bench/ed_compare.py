"""Education distillation against single-teacher KD, multi-teacher KD and ED + KCD on digits (docs/methods/ed.md §9).

    .venv/bin/python bench/ed_compare.py [--seeds 0 1 2] [--epochs 18] [--grade-epochs 6 6 6] [--lr-mode per_grade]
                                         [--methods kd mtkd ed_spec ed ed_seq ed_kcd] [--out runs/bench_ed]

Everything runs in this process on the engine (``kcd_ray.engine``: the same components, hooks and checkpoints
as a Ray Train worker), fed by plain Python batches: each epoch serves the selection the engine published
(ED's grade, KCD's mask), shuffled by (seed, epoch), with the pipeline's CIFAR-style augmentation
(``transforms.train_transform``). In-process feeding is what makes ED's *sequential* passes over D_1..D_g
(the code's order, ``ed_seq``) measurable next to the mixed batches the Ray Data pipeline serves (``ed``).

Teachers (trained once, shared by every seed): one resnet20 per class group on its classes only (local
labels), and three full-label resnet20 teachers (seeds 0, 1, 2): the first is single-teacher KD's teacher, all
three are MTKD's. Students: resnet8, the same optimiser and epochs for every method (cosine from 0.05, batch 64).
ED rows: ``ed_spec`` is the spec's reading (the global schedule, grades at 149/30/61 of 240 scaled to 11/2/5 of
18 epochs); ``ed``, ``ed_seq`` (sequential passes) and ``ed_kcd`` (+ KCD: rho 0.7, every 3 epochs, 6 stages)
use ``--grade-epochs`` and ``--lr-mode`` (default: even grades, the flagged ``per_grade`` restart; the recipe
``experiments/ed/digits.yaml``).

Reported per method (mean +- standard error over seeds): last-epoch top-1 on the whole test split, per-group
top-1 of the final model, the seen-class top-1 at the end of each grade (ED), sample-passes, and wall seconds.
"""

from __future__ import annotations

import argparse
import json
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
from kcd_ray.data.groups import ClassGroups, local_label_feeds, sequential_order  # noqa: E402
from kcd_ray.engine import assemble_engine  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import add_seed_args, fmt_mean_se, md_table, mean_se  # noqa: E402

G = 3
DATA = {"name": "digits", "image_size": 16}  # --data synthetic: a CIFAR-shaped set with --classes classes
OPTIM = {"batch_size": 64, "lr": 0.05, "scheduler": "cosine", "eval_batch_size": 512, "threads": 1}
KD = {"method": "kd", "gamma": 0.1, "alpha": 0.9, "beta": 0.0, "temperature": {"schedule": "constant", "T": 4.0}}


def load_split(data_dir, name):
    meta = T.read_meta(data_dir)
    rows = list(iter_split(data_dir, name))
    ids = np.concatenate([b.column("sample_id").to_numpy() for b in rows])
    labels = np.concatenate([b.column("label").to_numpy() for b in rows])
    raw = T.decode_images([x for b in rows for x in b.column("image").to_pylist()], meta)
    return {"ids": ids, "labels": labels, "raw": raw, "meta": meta}


class Feed:
    """Train batches of the published selection, shuffled by (seed, epoch), augmented; test batches fixed."""

    def __init__(self, train, test, seed, batch_size, sequential=False):
        self.train, self.seed, self.bs, self.sequential = train, seed, batch_size, sequential
        self.test = [{"image": T.eval_transform(test["raw"][i:i + 512], test["meta"]),
                      "label": torch.as_tensor(test["labels"][i:i + 512]),
                      "sample_id": torch.as_tensor(test["ids"][i:i + 512])} for i in range(0, len(test["ids"]), 512)]
        self.engine = None

    def test_batches(self):
        return iter(self.test)

    def __call__(self, epoch):
        kept, _ = self.engine.services.mask
        ids = self.train["ids"] if kept is None else np.asarray(kept)
        rng = np.random.default_rng([self.seed, epoch & 0x7FFFFFFF])
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        if self.sequential:  # ED's code: one shuffled pass per group, D_1 first
            ed = self.engine.hook("ed")
            passes = sequential_order(ids, self.train["labels"][ids], ed.groups, ed.grade, rng)
        else:
            passes = [rng.permutation(ids)]
        for order in passes:
            for i in range(0, len(order), self.bs):
                j = order[i:i + self.bs]
                x = T.train_transform(self.train["raw"][j], self.train["meta"], "cifar", gen)
                yield {"image": x, "label": torch.as_tensor(self.train["labels"][j]), "sample_id": torch.as_tensor(j)}


def run(cfg, kind, data, folder: Path, seed: int, sequential=False, local=False):
    engine = assemble_engine(cfg, torch.device("cpu"), kind=kind, data_dir=data["dir"], run_dir=folder)
    feed = Feed(data["train"], data["test"], seed, cfg.optim.batch_size, sequential)
    feed.engine = engine
    train, test = feed, feed.test_batches
    if local:
        train, test, _ = local_label_feeds(cfg.curriculum, data["dir"], train, test)
    engine.test_batches = test
    t0 = time.perf_counter()
    summary = engine.run(train, test)
    summary["bench_wall_seconds"] = time.perf_counter() - t0
    summary["group_top1_final_model"] = group_top1(engine.distiller.student, data, cfg)
    (folder / "bench_summary.json").write_text(json.dumps(summary, default=str))
    return summary


def group_top1(student, data, cfg):
    """Per-group top-1 of the final model (argmax over all classes) on the test split: forgetting, for every method."""
    k = int(data["test"]["meta"]["num_classes"])
    groups = ClassGroups.build(k, G)
    g_of = groups.group_of_label
    student.eval()
    hits, counts = np.zeros(G), np.zeros(G)
    with torch.no_grad():
        for i in range(0, len(data["test"]["ids"]), 512):
            x = T.eval_transform(data["test"]["raw"][i:i + 512], data["test"]["meta"])
            y = data["test"]["labels"][i:i + 512]
            if getattr(student, "num_classes", k) != k:
                return None
            pred = student(x).argmax(1).numpy()
            for h in range(G):
                m = g_of[y] == h + 1
                hits[h] += (pred[m] == y[m]).sum()
                counts[h] += m.sum()
    return (100.0 * hits / np.maximum(counts, 1)).tolist()


def base(root: Path, epochs: int, seed: int, **sections) -> dict:
    d = {"model": "resnet8", "data": {**DATA, "root": str(root / "data")},
         "optim": {**OPTIM, "epochs": epochs, "seed": seed}, "scaling": {"num_workers": 0},
         "run": {"verbose": 0}, "kcd": {"enabled": False}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_args(ap)
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--grade-epochs", type=int, nargs=G, default=[6, 6, 6])
    ap.add_argument("--lr-mode", choices=("global", "per_grade"), default="per_grade")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--methods", nargs="+", default=["kd", "mtkd", "ed_spec", "ed", "ed_seq", "ed_kcd"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_ed"))
    ap.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    ap.add_argument("--classes", type=int, default=30, help="synthetic: classes (CIFAR-shaped 32x32)")
    ap.add_argument("--per-class", type=int, default=60, help="synthetic: training samples per class")
    return ap.parse_args(argv)


def train_teachers(args, out: Path, data: dict) -> tuple[list[str], list[str], dict]:
    """(group teachers, full-label teachers, wall seconds of each kind): trained once, shared by every seed."""
    wall, group_teachers, full_teachers = {}, [], []
    t0 = time.perf_counter()
    for g in range(1, G + 1):
        f = out / "teachers" / f"group{g}" / "final_model.pt"
        if not f.exists():
            cfg = load_config(base=base(out, args.teacher_epochs, 0, model="resnet20",
                                        curriculum={"groups": G, "only_groups": [g], "labels": "local"}))
            s = run(cfg, "teacher", data, f.parent, 0, local=True)
            print(f"group teacher {g}: top1 {s['final_top1']:.2f} on its classes", flush=True)
        group_teachers.append(str(f))
    wall["group"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s_ in range(3 if "mtkd" in args.methods else 1):
        f = out / "teachers" / f"full{s_}" / "final_model.pt"
        if not f.exists():
            cfg = load_config(base=base(out, args.teacher_epochs, s_, model="resnet20"))
            s = run(cfg, "teacher", data, f.parent, s_)
            print(f"full teacher {s_}: top1 {s['final_top1']:.2f}", flush=True)
        full_teachers.append(str(f))
    wall["full"] = time.perf_counter() - t0
    return group_teachers, full_teachers, wall


def method_sections(args, group_teachers: list[str], full_teachers: list[str]) -> tuple[dict, list[int]]:
    """(config sections of each method, the spec's grade epochs scaled to the run)."""
    cut = np.cumsum([149, 30, 61]) / 240 * args.epochs  # docs/methods/ed.md §7's grade changes, scaled
    spec_grades = [int(round(cut[0])), int(round(cut[1])) - int(round(cut[0])), args.epochs - int(round(cut[1]))]
    ed = {"name": "ed", "groups": G, "grade_epochs": list(args.grade_epochs), "mix_groups": True,
          "lr_mode": args.lr_mode, "teachers": group_teachers}
    return {
        "kd": dict(distill={**KD, "teacher": full_teachers[0]}),
        "mtkd": dict(distill={**KD, "method": "mtkd", "teachers": full_teachers}),
        "ed_spec": dict(distill={"method": "ed"}, curriculum={**ed, "lr_mode": "global", "grade_epochs": spec_grades}),
        "ed": dict(distill={"method": "ed"}, curriculum=ed),
        "ed_seq": dict(distill={"method": "ed"}, curriculum={**ed, "mix_groups": False}),
        "ed_kcd": dict(distill={"method": "ed"}, curriculum=ed,
                       kcd={"enabled": True, "interval": 3, "rho": 0.7, "stages": 6}),
    }, spec_grades


def print_table(args, data: dict, results: dict, spec_grades: list[int], teacher_wall: dict) -> None:
    meta = data["train"]["meta"]
    sizes = "/".join(str(n) for n in ClassGroups.build(int(meta["num_classes"]), G).sizes)
    print(f"{args.data} ({len(data['train']['ids'])} train / {len(data['test']['ids'])} test, {meta['num_classes']} "
          f"classes in {G} groups {sizes}), student resnet8, {args.epochs} epochs, "
          f"seeds {args.seeds}; teachers resnet20 x {args.teacher_epochs} epochs; ed_spec grades {spec_grades} global, "
          f"ed/ed_seq/ed_kcd grades {args.grade_epochs} {args.lr_mode}")
    print(f"teacher training wall: {G} group teachers {teacher_wall['group']:.0f}s (0 if reused), "
          f"full teachers {teacher_wall['full']:.0f}s")
    rows = []
    for m, rs in results.items():
        grp = [mean_se([r["group_top1_final_model"][h] for r in rs if r.get("group_top1_final_model")])
               for h in range(G)]
        ends = "-"
        if rs and rs[0].get("curriculum"):
            ends = "/".join(f"{mean_se([r['curriculum']['seen_class_top1_at_grade_end'][h] for r in rs])[0]:.1f}"
                            for h in range(G))
        rows.append([m, fmt_mean_se([r["final_top1"] for r in rs]), fmt_mean_se([r["best_top1"] for r in rs]),
                     "/".join(f"{g[0]:.1f}" for g in grp), ends, int(np.mean([r["sample_passes"] for r in rs])),
                     f"{np.mean([r['bench_wall_seconds'] for r in rs]):.1f}"])
    print("\n".join(md_table(["method", "last-epoch top-1", "best top-1", "final per-group top-1 (g1/g2/g3)",
                               "seen-class top-1 at grade ends (g1/g2/g3)", "sample-passes", "wall s"], rows)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data == "synthetic":
        DATA.clear()
        DATA.update(name="synthetic", synthetic={"num_train": args.classes * args.per_class, "num_test":
                                                 args.classes * 20, "num_classes": args.classes, "image_size": 32})
    torch.set_num_threads(1)
    out = Path(args.out)
    data_dir = prepare_dataset(load_config(base=base(out, 1, 0)).data, verbose=False)
    data = {"dir": str(data_dir), "train": load_split(data_dir, "train"), "test": load_split(data_dir, "test")}
    t_all = time.perf_counter()
    group_teachers, full_teachers, teacher_wall = train_teachers(args, out, data)
    methods, spec_grades = method_sections(args, group_teachers, full_teachers)
    results: dict[str, list] = {m: [] for m in args.methods}
    print(f"ed_spec grades {spec_grades} (global schedule); ed/ed_seq/ed_kcd grades {args.grade_epochs} "
          f"(lr_mode {args.lr_mode})", flush=True)
    for seed in args.seeds:
        for m in args.methods:
            folder = out / m / f"seed{seed}"
            done = folder / "bench_summary.json"
            if done.exists():
                s = json.loads(done.read_text())
            else:
                cfg = load_config(base=base(out, args.epochs, seed, **methods[m]))
                s = run(cfg, "distill", data, folder, seed, sequential=m == "ed_seq")
            results[m].append(s)
            print(f"{m:7s} seed {seed}: top1 {s['final_top1']:.2f}  passes {s['sample_passes']}  "
                  f"{s['bench_wall_seconds']:.1f}s", flush=True)
    print()
    print_table(args, data, results, spec_grades, teacher_wall)
    print(f"\ntotal wall {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
