"""Several sweep folders (or run folders) in one Pareto plot: one point per strategy and setting, runs that differ
only in ``optim.seed`` averaged (final top-1 mean and standard error, mean compute_ratio), the points as a table
with the Pareto front marked, ``compare_points.csv`` and ``compare_pareto.png`` (one colour per strategy, error
bars, plain KD starred)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kcd_ray.report.runs import flatten, is_run, load_folder, load_run, strategy_info
from kcd_ray.report.tables import fmt, format_table, mean_se, pareto_flags, write_csv

# Config keys that never make two runs different experiments when grouping runs into points: the seed (a point
# averages over it), the strategy (its own column) and bookkeeping. run.* is all bookkeeping.
GROUP_IGNORED = ("optim.seed", "optim.threads", "selection.strategy", "kcd.enabled")
POINT_COLUMNS = ("strategy", "setting", "compute_ratio", "sample_pass_ratio", "final_top1_mean", "final_top1_se",
                 "n_seeds", "seeds", "n_runs", "best_top1_mean", "pareto", "folders")


def strategy_sections() -> tuple[str, ...]:
    """Config sections some registered strategy owns (its own sub-section, or one it reads such as ``kcd``): a
    value there tells two runs apart only for the strategies that read it."""
    from kcd_ray.config import Config
    from kcd_ray.engine.selection import STRATEGIES

    cfg = Config()
    return tuple(dict.fromkeys(s for _, cls in STRATEGIES.items() for s in cls.config_sections(cfg)))


def relevant(flat: dict, info: dict, owned: tuple[str, ...]) -> dict:
    """The config values that can change a run of this strategy: a section a strategy owns only when this run's
    strategy reads it (its recorded ``sections``); seed, strategy and run.* bookkeeping left out."""
    mine = tuple(info.get("sections") or ())
    out = {}
    for k, v in flat.items():
        if k.split(".", 1)[0] == "run" or k in GROUP_IGNORED:
            continue
        in_owned = any(k == s or k.startswith(s + ".") for s in owned) or (k.startswith("selection.")
                                                                            and k.count(".") >= 2)
        if in_owned and not any(k == s or k.startswith(s + ".") for s in mine):
            continue
        out[k] = v
    return out


def _seed_order(seed):
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def _group(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs -> {strategy tag: [groups]}, a group being the runs of one setting (all seeds)."""
    owned = strategy_sections()
    groups: dict[tuple, dict] = {}
    for r in runs:
        info = strategy_info(r)
        flat = flatten(r["config"])
        rel = relevant(flat, info, owned)
        key = (info["tag"], json.dumps(rel, sort_keys=True, default=str))
        g = groups.setdefault(key, {"strategy": info["tag"], "info": info, "values": rel, "runs": []})
        g["runs"].append((flat.get("optim.seed"), r))
    by_strategy: dict[str, list[dict]] = {}
    for g in groups.values():
        by_strategy.setdefault(g["strategy"], []).append(g)
    return by_strategy


def _point(g: dict, varying: list[str]) -> dict:
    per_seed: dict = {}
    for seed, r in g["runs"]:
        per_seed.setdefault(json.dumps(seed), []).append(r["summary"])

    def seed_means(key):
        vals = [[s.get(key) for s in ss] for ss in per_seed.values()]
        if any(v is None for vs in vals for v in vs):
            return None
        return [sum(vs) / len(vs) for vs in vals]

    top1, cr = seed_means("final_top1"), seed_means("compute_ratio")
    spr, best = seed_means("sample_pass_ratio"), seed_means("best_top1")
    mean, se = mean_se(top1)
    return {
        "strategy": g["strategy"], "info": g["info"],
        "setting": ", ".join(f"{k}={fmt(g['values'].get(k))}" for k in varying) or "-",
        "compute_ratio": sum(cr) / len(cr), "sample_pass_ratio": None if spr is None else sum(spr) / len(spr),
        "final_top1_mean": mean, "final_top1_se": se, "n_seeds": len(per_seed),
        "seeds": sorted((json.loads(k) for k in per_seed), key=_seed_order),
        "n_runs": len(g["runs"]), "best_top1_mean": None if best is None else sum(best) / len(best),
        "folders": sorted({str(r.get("folder", r["path"].parent)) for _, r in g["runs"]}),
        "runs": [r["name"] for _, r in g["runs"]], "values": {k: g["values"].get(k) for k in varying},
    }


def aggregate_points(runs: list[dict]) -> list[dict]:
    """Finished distillation runs -> one point per (strategy, setting): runs that differ only in ``optim.seed``
    (and bookkeeping) are one point, its final top-1 the mean over seeds with the standard error, its compute
    ratio the mean. Runs of the same seed (plain-KD baselines of several sweeps) are averaged first, so ``n_seeds``
    counts distinct seeds. ``setting`` names the config values that tell the point from its strategy's others.
    Plain KD comes first, then the strategies in the order they first appear."""
    points = []
    for gs in _group(runs).values():
        keys = list(dict.fromkeys(k for g in gs for k in g["values"]))
        varying = [k for k in keys if len({json.dumps(g["values"].get(k), sort_keys=True, default=str)
                                           for g in gs}) > 1]
        points += [_point(g, varying) for g in gs]
    order = {tag: i for i, tag in enumerate(dict.fromkeys(p["strategy"] for p in points))}
    baseline = lambda p: p["info"].get("name") != "none"  # noqa: E731 - the plain-KD baseline sorts first
    points.sort(key=lambda p: (baseline(p), order[p["strategy"]], p["compute_ratio"], p["setting"]))
    for p, flag in zip(points, pareto_flags([(p["compute_ratio"], p["final_top1_mean"]) for p in points])):
        p["pareto"] = flag
    return points


def _collect(path: Path) -> tuple[str, list[dict]]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected a sweep folder or a run folder)")
    if is_run(path):
        return path.name, [load_run(path)]
    _, name, _, runs = load_folder(path)
    return name, runs


def _usable_runs(folders: list[Path]) -> tuple[list[dict], list[str], dict]:
    """Finished distillation runs of the folders (each once), a line per folder, and counts of those skipped."""
    seen, runs, lines, skipped = set(), [], [], {"unfinished": 0, "teacher": 0, "no compute_ratio or top-1": 0}
    for f in folders:
        name, found = _collect(f)
        counts: dict[str, int] = {}
        for r in found:
            where = r["path"].resolve()
            if where in seen:
                continue
            seen.add(where)
            tag = strategy_info(r)["tag"]
            if r["status"] != "done":
                skipped["unfinished"] += 1
            elif r["summary"].get("kind") == "teacher":
                skipped["teacher"] += 1
            elif r["summary"].get("compute_ratio") is None or r["summary"].get("final_top1") is None:
                skipped["no compute_ratio or top-1"] += 1
            else:
                runs.append(dict(r, folder=f))
                counts[tag] = counts.get(tag, 0) + 1
        lines.append(f"  {f} ({name}): {len(found)} runs, {sum(counts.values())} used"
                     + "".join(f"; {v} x{n}" for v, n in counts.items()))
    return runs, lines, skipped


def _out_dir(folders: list[Path], out_dir) -> Path:
    if out_dir:
        return Path(out_dir).expanduser()
    resolved = [f.resolve() for f in folders]
    return resolved[0] if len(resolved) == 1 else Path(os.path.commonpath(resolved))


def compare_report(paths, out_dir=None) -> dict:
    """Several sweep folders (or run folders) -> one Pareto plot (module docstring), in ``out_dir`` (default: the
    folders' common parent). Only finished distillation runs count; unfinished ones and teachers are skipped."""
    folders = [Path(p).expanduser() for p in paths]
    if not folders:
        raise ValueError("report: no folders given")
    runs, lines, skipped = _usable_runs(folders)
    if not runs:
        raise ValueError(f"{', '.join(map(str, folders))}: no finished distillation runs to compare")
    points = aggregate_points(runs)
    out = _out_dir(folders, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(points, list(POINT_COLUMNS), out / "compare_points.csv")
    from kcd_ray.plots import pareto_plot

    shown = [dict(p, final_top1=p["final_top1_mean"]) for p in points]
    png = pareto_plot(shown, "final_top1", out / "compare_pareto.png",
                      "final top-1 vs compute: " + ", ".join(dict.fromkeys(p["info"]["label"] for p in points)),
                      err_key="final_top1_se")
    rows = [dict(p, top1=fmt(p["final_top1_mean"]) + ("" if p["final_top1_se"] is None
                                                      else f" +- {fmt(p['final_top1_se'])}"),
                 pareto="yes" if p["pareto"] else "") for p in points]
    front = [p for p in sorted(points, key=lambda p: p["compute_ratio"]) if p["pareto"]]
    text = [f"compare {len(folders)} folder(s): {len(runs)} finished runs -> {len(points)} points "
            "(final top-1: mean +- standard error over seeds)", *lines]
    if any(skipped.values()):
        text.append("skipped: " + ", ".join(f"{n} {k}" for k, n in skipped.items() if n))
    text += [format_table(rows, ["strategy", "setting", "compute_ratio", "top1", "n_seeds", "n_runs", "pareto"]),
             "Pareto front (cheapest first): " + "; ".join(
                 f"{p['strategy']}{'' if p['setting'] == '-' else ' ' + p['setting']} "
                 f"({fmt(p['compute_ratio'])}, {fmt(p['final_top1_mean'])})" for p in front),
             f"CSV: {csv_path}", f"plot: {png}"]
    return {"kind": "compare", "paths": [str(f) for f in folders], "points": points,
            "pareto": front, "skipped": skipped, "csv": str(csv_path), "png": str(png), "text": "\n".join(text)}
