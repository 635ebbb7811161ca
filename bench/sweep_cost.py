"""What a sweep costs against one plain KD run, measured on the same machine in one run:

    .venv/bin/python bench/sweep_cost.py [--seeds 0 1 2] [--epochs 18] [--image-size 32] [--trials-at-once 2]
                                         [--out runs/bench_sweep_cost] [--eval-every 3] [--rung 0.33]
                                         [--reduction-factor 4] [--ascending]

Arms, per seed (``optim.seed``), on scikit-learn's digits at 32x32 (``--image-size``; a run long enough that a
trial's fixed start-up is not most of it) with a validation split (1,078 train / 269 validation / 450 test), resnet20
teacher (trained once, 15 epochs, reused) -> resnet8 student, KD (gamma 0.1, alpha
0.9), SGD batch 64, lr 0.05, cosine, ``--epochs`` epochs, validation and test every 3rd epoch and the last
(``optim.eval_every=3``, every arm):

- (a) one plain KD run, the teacher in the loop, every sample every epoch: ``fit`` in this process on the embedded
  local Ray (``scaling.num_workers=0``: the loop in the driver, the fastest single run here; torch threads = cores);
- (b) an 8-trial grid sweep on Ray Tune: KCD at budgets 0.7/0.6/0.5/0.4 (``selection.budget``: KCD sets rho; the
  largest first) x two temperature schedules (constant 4; cosine 8 -> 2), with the shared teacher-output cache
  (``distill.cache=exact``; its build is timed with the sweep), ASHA on ``val_top1`` (one rung at a third of the
  epochs, reduction factor 4), ``trials_at_once`` in-process trials sharing the machine, Tune reusing the trial
  processes;
- (c) the same 8 trials without the cache and without ASHA.

Also (once): trial start-up, 8 one-epoch trials on 8x8 digits with Tune reusing the trial processes against a new
process per trial (``reuse_trial_processes``), in seconds per trial.

Printed: the wall seconds of each arm (Ray's start-up, shared, is not in any arm), (b)/(a), (c)/(a), and the test
top-1 of the trial the sweep chose on validation (the report's best by ``val_top1``) against KD's test top-1 (both the
last epoch's), per seed and as mean +- standard error. Finished arms are read back on a rerun
(``<out>/s<seed>_.../*.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from functools import partial
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_seed_args, cached_result, fmt_mean_se, md_table, mean_se  # noqa: E402

KD = {"method": "kd", "gamma": 0.1, "alpha": 0.9, "beta": 0.0, "temperature": {"schedule": "constant", "T": 4.0}}
BUDGETS = (0.7, 0.6, 0.5, 0.4)


@dataclass(frozen=True)
class Protocol:
    """How the arms evaluate and how ASHA cuts the sweep. Defaults: every arm evaluates every 3rd epoch and the
    last; one ASHA rung a third of the way in, on an evaluated epoch, keeping the top quarter; the largest budget
    first (ASHA is asynchronous: a trial meets its rung's cut-off among the trials that reached the rung before
    it, so the strongest trials set the bar). ``--eval-every 1 --rung 0.5 --reduction-factor 2 --ascending`` is
    the first protocol measured (BENCHMARKS.md)."""
    eval_every: int = 3
    rung: float = 1 / 3
    reduction_factor: float = 4
    largest_first: bool = True

    def tag(self) -> str:
        return (f"ev{self.eval_every}_rung{self.rung:.2f}_rf{self.reduction_factor:g}"
                f"{'' if self.largest_first else '_asc'}")

    def grace(self, epochs: int) -> int:
        # ASHA counts the reported "epoch" (from 0): the rung at epoch k*eval_every - 1 sees that epoch's evaluation
        ev = self.eval_every
        return max(ev, int(epochs * self.rung) // ev * ev) - 1
TEMPERATURES = ({"schedule": "constant", "T": 4.0}, {"schedule": "cosine", "T": 8.0, "T_end": 2.0})


def base_config(out: Path, epochs: int, seed: int, teacher: str, threads: int, px: int, eval_every: int = 1) -> dict:
    return {"model": "resnet8",
            "data": {"name": "digits", "image_size": px, "val_fraction": 0.2, "root": str(out / "data")},
            "optim": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "scheduler": "cosine", "seed": seed,
                      "eval_batch_size": 512, "threads": threads, "eval_every": eval_every},
            "distill": {**KD, "teacher": teacher},
            "kcd": {"interval": 2, "stages": 3},
            "scaling": {"num_workers": 0, "cpus_per_worker": float(threads), "data_cpus": 0.25},
            "run": {"verbose": 0, "storage_path": str(out / "runs")}}


def train_teacher(out: Path, px: int) -> str:
    from kcd_ray.config import load_config
    from kcd_ray.ray_layer.trainer import fit

    name = f"teacher{px}"
    path = out / "runs" / name / "final_model.pt"
    if not path.is_file():
        cfg = base_config(out, 15, 0, "", os.cpu_count() or 1, px)
        cfg.pop("distill"), cfg.pop("kcd")
        cfg["model"], cfg["run"]["name"] = "resnet20", name
        fit(load_config(base=cfg), kind="teacher")
    return str(path)


def arm_kd(out: Path, seed: int, epochs: int, teacher: str, px: int, proto: Protocol) -> dict:
    from kcd_ray.config import load_config
    from kcd_ray.ray_layer.trainer import fit

    cfg = base_config(out, epochs, seed, teacher, os.cpu_count() or 1, px, proto.eval_every)
    cfg["run"]["name"] = f"kd_s{seed}_{int(time.time())}"
    cfg["selection"] = {"strategy": "none"}
    t0 = time.perf_counter()
    s = fit(load_config(base=cfg))
    return {"wall_s": time.perf_counter() - t0, "test_top1": s["final_top1"], "val_top1": s.get("final_val_top1"),
            "compute_ratio": s["compute_ratio"]}


def arm_sweep(out: Path, seed: int, epochs: int, teacher: str, px: int, proto: Protocol, *, cached: bool,
              asha: bool, at_once: int) -> dict:
    from kcd_ray.ray_layer.tune.sweep import run_sweep
    from kcd_ray.report import report

    tag = f"{'cache' if cached else 'nocache'}_{'asha' if asha else 'full'}_s{seed}_{int(time.time())}"
    base = base_config(out, epochs, seed, teacher, 1, px, proto.eval_every)
    base["selection"] = {"strategy": "kcd"}
    base["distill"]["cache"] = "exact" if cached else "off"
    base["distill"]["cache_dir"] = str(out / "caches" / tag)  # a fresh cache: its build is part of the arm
    spec = {"name": tag, "base": base, "search": "grid", "metric": "val_top1", "trials_at_once": at_once,
            "space": {"selection.budget": sorted(BUDGETS, reverse=proto.largest_first),
                      "distill.temperature": list(TEMPERATURES)},
            "storage_path": str(out / "sweeps")}
    if asha:
        spec["asha"] = {"grace_period": proto.grace(epochs), "reduction_factor": proto.reduction_factor}
    t0 = time.perf_counter()
    folder = run_sweep(spec)
    wall = time.perf_counter() - t0
    res = report(folder)
    best = res["best"]
    shutil.rmtree(out / "caches" / tag, ignore_errors=True)
    return {"wall_s": wall, "trials": len(res["rows"]), "chosen": best["run"], "chosen_val_top1": best["val_top1"],
            "test_top1": best["final_top1"], "chosen_compute_ratio": best["compute_ratio"],
            "stopped_early": sum(1 for r in res["rows"] if (r.get("epochs_done") or 0) < epochs)}


def startup_cost(out: Path, at_once: int) -> dict:
    """Trial start-up: 8 one-epoch trials on 8x8 digits (training is a small share), Tune reusing the trial
    processes or starting a new one per trial; seconds per trial = wall x trials_at_once / trials."""
    from kcd_ray.ray_layer.tune.sweep import run_sweep

    res = {}
    for reuse in (False, True):
        base = base_config(out, 1, 0, _tiny_teacher(out), 1, 8)  # 8x8: start-up, not training
        tag = f"startup_reuse{int(reuse)}_{int(time.time())}"
        t0 = time.perf_counter()
        run_sweep({"name": tag, "base": base, "search": "grid", "trials_at_once": at_once,
                   "reuse_trial_processes": reuse, "space": {"optim.lr": [0.01 * (i + 1) for i in range(8)]},
                   "storage_path": str(out / "sweeps")})
        res[f"reuse_{reuse}"] = (time.perf_counter() - t0) * at_once / 8
    return res


def _tiny_teacher(out: Path) -> str:
    """An untrained resnet8 for the 8x8 start-up sweeps (their accuracy is not the point)."""
    import torch

    from kcd_ray.models import build_model, save_model

    path = out / "tiny_teacher_resnet8.pt"
    if not path.is_file():
        torch.manual_seed(0)
        save_model(path, build_model("resnet8", 10))
    return str(path)


def report_lines(results: dict) -> list[str]:
    seeds = sorted(results)
    rows = []
    for s in seeds:
        a, b, c = (results[s][k] for k in ("a", "b", "c"))
        rows.append([s, f"{a['wall_s']:.0f}", f"{b['wall_s']:.0f}", f"{c['wall_s']:.0f}",
                     f"{b['wall_s'] / a['wall_s']:.2f}", f"{c['wall_s'] / a['wall_s']:.2f}", f"{a['test_top1']:.2f}",
                     f"{b['test_top1']:.2f}", f"{c['test_top1']:.2f}", b["stopped_early"]])
    col = lambda arm, k: [results[s][arm][k] for s in seeds]  # noqa: E731
    ratio = lambda arm: [results[s][arm]["wall_s"] / results[s]["a"]["wall_s"] for s in seeds]  # noqa: E731
    rows.append(["mean +- SE", fmt_mean_se(col("a", "wall_s"), 0), fmt_mean_se(col("b", "wall_s"), 0),
                 fmt_mean_se(col("c", "wall_s"), 0), fmt_mean_se(ratio("b")), fmt_mean_se(ratio("c")),
                 fmt_mean_se(col("a", "test_top1")), fmt_mean_se(col("b", "test_top1")),
                 fmt_mean_se(col("c", "test_top1")), ""])
    lines = md_table(["seed", "(a) KD s", "(b) sweep+cache+ASHA s", "(c) sweep s", "(b)/(a)", "(c)/(a)",
                      "KD test top-1", "(b) chosen test top-1", "(c) chosen test top-1", "(b) stopped by ASHA"], rows)
    gap = mean_se([results[s]["b"]["test_top1"] - results[s]["a"]["test_top1"] for s in seeds])
    rb = mean_se(ratio("b"))[0]
    lines += ["", f"(b)/(a) = {rb:.2f} (target <= 2.0: {'met' if rb <= 2.0 else 'NOT met'}); chosen-on-validation "
              f"test top-1 minus KD's: {gap[0]:+.2f} +- {gap[1]:.2f} (target >= -0.5: "
              f"{'met' if gap[0] >= -0.5 else 'NOT met'})"]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_args(ap)
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--trials-at-once", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_sweep_cost")
    ap.add_argument("--eval-every", type=int, default=Protocol.eval_every)
    ap.add_argument("--rung", type=float, default=Protocol.rung, help="ASHA's rung, as a fraction of the epochs")
    ap.add_argument("--reduction-factor", type=float, default=Protocol.reduction_factor)
    ap.add_argument("--ascending", action="store_true", help="the smallest budget first")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    proto = Protocol(args.eval_every, args.rung, args.reduction_factor, not args.ascending)
    import ray

    from kcd_ray.config import load_config
    from kcd_ray.ray_layer.trainer import init_ray

    init_ray(load_config(base={"run": {"verbose": 0}}))  # one local Ray for every arm (its start-up in none)
    px = args.image_size
    teacher = train_teacher(out, px)
    results = {}
    for seed in args.seeds:
        d = out / f"s{seed}_e{args.epochs}_px{args.image_size}_t{args.trials_at_once}_{proto.tag()}"
        a = cached_result(d / "a_kd.json", partial(arm_kd, out, seed, args.epochs, teacher, px, proto))
        print(f"[sweep_cost] seed {seed} (a) KD: {a['wall_s']:.0f}s, test top-1 {a['test_top1']:.2f}", flush=True)
        b = cached_result(d / "b_sweep_cache_asha.json", partial(
            arm_sweep, out, seed, args.epochs, teacher, px, proto, cached=True, asha=True,
            at_once=args.trials_at_once))
        print(f"[sweep_cost] seed {seed} (b) sweep + cache + ASHA: {b['wall_s']:.0f}s, chosen {b['chosen']} test "
              f"top-1 {b['test_top1']:.2f}", flush=True)
        c = cached_result(d / "c_sweep_plain.json", partial(
            arm_sweep, out, seed, args.epochs, teacher, px, proto, cached=False, asha=False,
            at_once=args.trials_at_once))
        print(f"[sweep_cost] seed {seed} (c) sweep: {c['wall_s']:.0f}s, chosen {c['chosen']} test top-1 "
              f"{c['test_top1']:.2f}", flush=True)
        results[seed] = {"a": a, "b": b, "c": c}
    lines = report_lines(results)
    start = cached_result(out / f"startup_t{args.trials_at_once}.json", partial(startup_cost, out, args.trials_at_once))
    lines += ["", f"trial start-up (8 one-epoch 8x8 trials, {args.trials_at_once} at once): "
              f"{start['reuse_False']:.1f} s per trial with a new process each, {start['reuse_True']:.1f} s reusing "
              f"them ({start['reuse_False'] / start['reuse_True']:.2f}x)"]
    print("\n".join(lines), flush=True)
    (out / f"sweep_cost_{proto.tag()}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
