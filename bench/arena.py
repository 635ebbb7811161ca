"""Data-efficiency arena: KCD against logit rivals and data-selection strategies at equal compute budgets, each run
the product's own path (``kcd_ray.ray_layer.trainer.fit``: the training loop in this process on an embedded local
Ray, Ray Data feeding it, the teacher-output cache, the compute ledger).

    python bench/arena.py --data fashion [--seeds 0 1 2] [--epochs 15] [--points kd kd-ls kcd-0.5 ...]
                          [--budgets 0.4 0.5 0.6 0.75] [--shard k/n] [--out runs/bench_arena] [--report-only]
                          [--set data.train_subset=2000 ...]

Protocol (``bench/arena_points.py``; BENCHMARKS.md, "Data-efficiency arena on Fashion-MNIST"):

- data ``fashion``: 17,500 class-stratified rows of Fashion-MNIST's training split (seed 0), 2,500 of them carved
  out as the validation split (15,000 train), the whole 10,000-image test set, 28 -> 32 px by zero padding, grey
  replicated to 3 channels (``apt-get install dataset-fashion-mnist``). ``digits`` (16 px) and the duplicate-heavy
  ``synthetic`` set run the same way, each with a 20% validation split;
- a resnet20 teacher trained once per data set on the training rows (20 epochs, ``fit(kind="teacher")``, all
  cores), reused by every run; ``<out>/<data>/runs/teacher``;
- student resnet8, SGD batch 64, lr 0.05, cosine, ``--epochs`` epochs, one torch thread, seeds ``--seeds``; the
  teacher's outputs from the exact cache (``distill.cache=exact``: built once per seed, shared by every run of that
  seed; the ledger still counts a teacher forward per output used, so compute ratios are as if the teacher ran);
- points: KD (gamma 0.1, alpha 0.9, T 4); KD + logit standardization; CTKD; DKD; and at each budget
  (``selection.budget``: the ledger's FLOPs against plain KD; each strategy sets its own parameter from it) KCD on
  KD, KCD on KD + LS, random subsets, UNIXKD and InfoBatch. KCD condenses every ``--kcd-interval`` epochs in
  ``--kcd-stages`` steps (default 1 and 3: the floor from epoch 3, so a 0.4 budget is reachable in 15 epochs). A
  budget its strategy cannot reach is recorded with the one-line reason and not run.

Every (data, point, seed) is one result file, ``<out>/<data>/points/<point>/s<seed>.json``: a rerun, or another
session, reads the finished ones; an interrupted run resumes from its checkpoint (``fit`` resumes a run name).
``--shard k/n`` runs every n-th run of the ordered list from the k-th, so n processes share the table (each one
torch thread); ``--report-only`` writes the tables, ``<out>/arena_<data>.json`` and ``<out>/pareto_<data>.png``
from the finished files. The protocol (data, epochs, KCD schedule, ``--set`` overrides) is recorded in
``<out>/<data>/protocol.json``; a different one is refused there (use another ``--out``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arena_points import (BUDGETS, DATA, TEACHER, base_config, deep_merge, ordered_points, parse_shard,  # noqa: E402
                          run_config, select_points, shard_runs, teacher_config, unreachable)
from arena_report import budget_markdown, headline_lines, plot_rows, point_table, points_markdown  # noqa: E402
from common import cached_result  # noqa: E402

DROP = ("config", "trained_under", "strategy_info")  # summary keys a result file leaves out (config.yaml has them)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["fashion"], choices=sorted(DATA))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--points", nargs="+", default=None, help="a subset of the points (default: all; KD always)")
    ap.add_argument("--kcd-interval", type=int, default=1)
    ap.add_argument("--kcd-stages", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=TEACHER["epochs"])
    ap.add_argument("--shard", default=None, help="k/n: run every n-th run from the k-th (n processes in parallel)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_arena"))
    ap.add_argument("--report-only", action="store_true", help="tables, JSON and plot from the finished runs")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides of every run (a smoke test: data.train_subset=2000); recorded")
    ap.add_argument("--list", action="store_true", help="print the points in their order and exit")
    return ap.parse_args(argv)


def parse_sets(items: list) -> dict:
    """``["a.b=1", ...]`` -> ``{"a": {"b": 1}}`` (values read as YAML scalars)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: {item!r}; expected KEY=VALUE, e.g. data.train_subset=2000")
        node: dict = {}
        parts = key.split(".")
        leaf = node
        for part in parts[:-1]:
            leaf = leaf.setdefault(part, {})
        leaf[parts[-1]] = yaml.safe_load(value)
        out = deep_merge(out, node)
    return out


def check_protocol(folder: Path, protocol: dict) -> None:
    """Record the protocol of ``folder``'s runs on first use; refuse a different one (its results would mix)."""
    path = folder / "protocol.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != protocol:
            changed = sorted(k for k in set(old) | set(protocol) if old.get(k) != protocol.get(k))
            raise SystemExit(f"{path}: this folder's runs used another protocol (differs in {', '.join(changed)}); "
                             "pass another --out, or the same options")
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(protocol, indent=1))


def ensure_teacher(base: dict, folder: Path, teacher: dict) -> Path:
    """The data set's teacher, trained once (every core) when missing; a file lock keeps two shards from both
    training it (the second waits, then finds it)."""
    path = folder / "runs" / "teacher" / "final_model.pt"
    if path.is_file():
        return path
    from kcd_ray.config import load_config
    from kcd_ray.ray_layer.trainer import fit

    with open(folder / "teacher.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            print(f"training the teacher ({teacher['model']}, {teacher['epochs']} epochs) -> {path}", flush=True)
            t0 = time.perf_counter()
            s = fit(load_config(base=teacher_config(base, os.cpu_count() or 1, teacher)), kind="teacher")
            print(f"teacher: test top-1 {s['final_top1']:.2f}, val {s.get('final_val_top1')}, "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    return path


def plan_base(base: dict):
    """The plain-KD run's plan (data prepared, teacher loaded, FLOPs measured), without Ray or a run folder."""
    from kcd_ray.config import load_config
    from kcd_ray.engine.plan import plan_run

    plan = plan_run(load_config(base=base), "distill", open_folder=False)
    c = plan.compute
    return plan, (c.student_forward, c.student_backward, c.teacher_forward)


def history_of(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_point(base: dict, point, seed: int) -> dict:
    """One run through ``fit``; its summary (less the config) with per-epoch curves and wall seconds."""
    from kcd_ray.config import load_config
    from kcd_ray.ray_layer.trainer import fit

    t0 = time.perf_counter()
    summary = fit(load_config(base=run_config(base, point, seed)))
    hist = history_of(summary["run_dir"])
    return {"point": point.name, "family": point.family, "budget": point.budget, "seed": seed,
            **{k: v for k, v in summary.items() if k not in DROP},
            "wall_s": summary.get("wall_seconds"), "fit_wall_s": time.perf_counter() - t0,
            "per_epoch": {k: [m.get(k) for m in hist] for k in ("top1", "val_top1", "kept_fraction", "T",
                                                               "epoch_seconds")}}


def claim(path: Path) -> bool:
    """Take ``path``'s claim file for this process; False when a live process holds it (two launches of one
    shard, or a shard beside an unsharded run, never train the same run twice)."""
    flag = path.with_suffix(".claim")
    flag.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(flag.read_text() or 0)
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError, PermissionError):
            flag.write_text(str(os.getpid()))  # a stale claim of a process that ended
            return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def result_path(folder: Path, point: str, seed: int) -> Path:
    return folder / "points" / point / f"s{seed}.json"


def run_shard(base: dict, folder: Path, todo: list, tag: str) -> None:
    """Run the pending (point, seed) pairs of this shard, most important first, printing each one's figures."""
    pending = [(p, s) for p, s in todo if not result_path(folder, p.name, s).is_file()]
    print(f"[{tag}] {len(todo)} runs in this shard, {len(todo) - len(pending)} finished, {len(pending)} to run",
          flush=True)
    t_all, failed = time.perf_counter(), []
    for i, (p, seed) in enumerate(pending):
        path = result_path(folder, p.name, seed)
        if not claim(path):
            print(f"[{tag}] {p.name} seed {seed}: running in another process, skipped", flush=True)
            continue
        if path.is_file():  # finished by another process since this one listed its runs
            path.with_suffix(".claim").unlink(missing_ok=True)
            continue
        try:
            r = cached_result(path, lambda p=p, seed=seed: run_point(base, p, seed))
        except Exception as e:  # noqa: BLE001 - one failed run (no result file: a rerun retries it) spares the rest
            failed.append(f"{p.name} seed {seed}")
            print(f"[{tag}] {p.name} seed {seed}: FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                  " (traceback in its run folder's error.log)", flush=True)
            continue
        finally:
            path.with_suffix(".claim").unlink(missing_ok=True)
        val = r.get("final_val_top1")
        print(f"[{tag}] {p.name} seed {seed}: test top-1 {r['final_top1']:.2f} (best {r['best_top1']:.2f}), val "
              f"{'-' if val is None else f'{val:.2f}'}, compute {r['compute_ratio']:.3f}, train {r['wall_s']:.0f}s "
              f"(fit {r['fit_wall_s']:.0f}s); {len(pending) - i - 1} runs left in this shard "
              f"[{time.perf_counter() - t_all:.0f}s]", flush=True)
    if failed:
        print(f"[{tag}] {len(failed)} runs failed (rerun the command to retry them): {', '.join(failed)}", flush=True)


def collect(folder: Path, points: list, seeds: list) -> dict:
    """{point: {seed: result}} of the finished result files."""
    out: dict = {}
    for p in points:
        for s in seeds:
            path = result_path(folder, p.name, s)
            if path.is_file():
                out.setdefault(p.name, {})[s] = json.loads(path.read_text())
    return out


def write_report(dname: str, ctx: dict, points: list, seeds: list, budgets: list, out: Path) -> None:
    """Markdown tables on stdout, ``arena_<data>.json`` (every run, every aggregate) and ``pareto_<data>.png``."""
    from kcd_ray.plots import pareto_plot

    results = collect(ctx["folder"], points, seeds)
    rows = point_table(points, results, ctx["unreachable"], seeds)
    lines = [f"## {dname}: {ctx['counts']}; teacher {ctx['teacher']}", ""] + points_markdown(rows) + [""]
    lines += ["Mean last-epoch test top-1 +- s.e. by budget (achieved compute ratio):", ""]
    lines += budget_markdown(rows, budgets) + [""] + headline_lines(rows)
    print("\n".join(lines), flush=True)
    png = out / f"pareto_{dname}.png"
    prow = plot_rows(rows)
    if prow:
        pareto_plot(prow, "test_top1", png, f"{dname}: last-epoch test top-1 vs compute (mean +- s.e.)",
                    err_key="test_top1_se", beside_key="val_top1", beside_err_key="val_top1_se")
    doc = {"data": dname, "protocol": ctx["protocol"], "counts": ctx["counts"], "teacher": ctx["teacher"],
           "flops_per_sample": ctx.get("flops"),
           "seeds": seeds, "points": rows, "runs": results, "headline": headline_lines(rows), "command": sys.argv}
    path = out / f"arena_{dname}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
    print(f"\n{dname}: JSON {path}" + (f"; plot {png}" if prow else ""), flush=True)


def prepare(dname: str, args, out: Path, overrides: dict, points: list) -> tuple[dict, dict]:
    """The data set's base config and context (folder, teacher, counts, unreachable points), the teacher trained
    first unless ``--report-only``."""
    folder = out / dname
    kcd = {"interval": args.kcd_interval, "stages": args.kcd_stages}
    teacher = {**TEACHER, "epochs": args.teacher_epochs}
    protocol = {"data": DATA[dname], "epochs": args.epochs, "kcd": kcd, "teacher": teacher, "overrides": overrides}
    check_protocol(folder, protocol)
    tfile = folder / "runs" / "teacher" / "final_model.pt"
    base = base_config(dname, str(out), args.epochs, str(tfile), overrides)
    if not args.report_only:
        ensure_teacher(base, folder, teacher)
    ctx = {"folder": folder, "protocol": protocol, "unreachable": {}, "counts": "teacher not trained yet",
           "teacher": {"file": str(tfile)}}
    if tfile.is_file():
        plan, flops = plan_base(base)
        d = plan.data
        ctx["counts"] = f"{d.num_train} train / {d.num_val} validation / {d.num_test} test rows (prepared meta)"
        tsum = tfile.parent / "summary.json"
        if tsum.is_file():
            t = json.loads(tsum.read_text())
            ctx["teacher"].update(test_top1=t.get("final_top1"), val_top1=t.get("final_val_top1"))
        ctx["flops"] = dict(zip(("student_forward", "student_backward", "teacher_forward"), flops))
        ctx["unreachable"] = unreachable(points, base, d, flops)
    return base, ctx


def main(argv=None) -> int:
    args = parse_args(argv)
    k, n = parse_shard(args.shard)
    points = select_points(ordered_points(args.budgets, {"interval": args.kcd_interval,
                                                         "stages": args.kcd_stages}), args.points)
    if args.list:
        print("\n".join(f"{p.name:16s} {p.family:10s} budget {p.budget}" for p in points))
        return 0
    out = Path(args.out).resolve()
    overrides = parse_sets(args.set)
    from kcd_ray.ray_layer.trainer import Interrupted

    for dname in args.data:
        try:  # Ctrl-C (or timeout -s INT) stops a run at its last checkpoint; the same command resumes it
            base, ctx = prepare(dname, args, out, overrides, points)
            print(f"[{dname}] {ctx['counts']}; teacher {ctx['teacher']}", flush=True)
            for name, why in ctx["unreachable"].items():
                print(f"[{dname}] {name}: unreachable, not run: {why}", flush=True)
            if not args.report_only:
                runs = [(p, s) for p in points if p.name not in ctx["unreachable"] for s in args.seeds]
                run_shard(base, ctx["folder"], shard_runs(runs, k, n), f"{dname} {k}/{n}")
        except Interrupted as e:
            print(f"[{dname}] {e}", flush=True)
            return 130
        write_report(dname, ctx, points, args.seeds, args.budgets, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
