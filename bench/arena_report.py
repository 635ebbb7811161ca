"""The arena's figures from its finished run files (pure code): each point's mean +- s.e. over seeds, the headline
(the smallest budget at which a strategy's mean test top-1 reaches a baseline's mean), the ranking at each budget,
the markdown tables and the rows of the Pareto plot."""

from __future__ import annotations

import math
from typing import Optional

from arena_points import BUDGETED, FAMILIES, Point
from common import md_table, mean_se

# Figures of a point, from each run's summary: (aggregate key, run key).
FIGURES = (("test", "final_top1"), ("val", "final_val_top1"), ("test_best", "best_top1"))


def aggregate(runs: list[dict]) -> dict:
    """Mean +- s.e. over seeds of the last-epoch test and validation top-1 and of the best-epoch test top-1; the
    mean achieved and planned compute ratio and wall seconds; what the budget set (the first run's)."""
    out: dict = {"seeds_done": len(runs)}
    for key, run_key in FIGURES:
        out[key], out[key + "_se"] = mean_se([r.get(run_key) for r in runs])
    for key in ("compute_ratio", "planned_compute_ratio", "sample_pass_ratio", "wall_s"):
        out[key] = mean_se([r.get(key) for r in runs])[0]
    out["resolved"] = (runs[0].get("budget_resolved") or {}) if runs else {}
    return out


def point_table(points: list[Point], results: dict, unreachable: dict, seeds: list) -> list[dict]:
    """One entry per point: its status (done, k/n seeds, not yet run, unreachable) and aggregate."""
    rows = []
    for p in points:
        runs = [results[p.name][s] for s in seeds if s in results.get(p.name, {})]
        if p.name in unreachable:
            status = "unreachable"
        elif not runs:
            status = "not yet run"
        else:
            status = "done" if len(runs) == len(seeds) else f"{len(runs)}/{len(seeds)} seeds"
        rows.append({"point": p.name, "family": p.family, "budget": p.budget, "status": status,
                     "reason": unreachable.get(p.name), **(aggregate(runs) if runs else {})})
    return rows


def complete(rows: list[dict]) -> dict:
    return {r["point"]: r for r in rows if r["status"] == "done"}


def headline(rows: list[dict], ref: str) -> Optional[dict]:
    """{family: the point at the smallest budget whose mean last-epoch test top-1 is at or above ``ref``'s mean
    (no allowance for the s.e.), or None}, over the budgeted families' finished points; None while ``ref`` is
    not finished."""
    done = complete(rows)
    if ref not in done:
        return None
    bar = done[ref]["test"]
    out: dict = {}
    for fam in BUDGETED:
        hits = [r for r in done.values() if r["family"] == fam and r["budget"] is not None and r["test"] >= bar]
        out[fam] = min(hits, key=lambda r: r["budget"]) if hits else None
    return out


def ranking(rows: list[dict]) -> dict:
    """{budget: the finished points at that budget, best mean last-epoch test top-1 first}."""
    by: dict = {}
    for r in complete(rows).values():
        if r["budget"] is not None:
            by.setdefault(r["budget"], []).append(r)
    return {b: sorted(rs, key=lambda r: -r["test"]) for b, rs in sorted(by.items())}


def _ms(r: dict, key: str) -> str:
    m, se = r.get(key), r.get(key + "_se")
    if m is None or math.isnan(m):  # missing, or NaN (no validation split)
        return "-"
    return f"{m:.2f} +- {se:.2f}"


def _setting(r: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in r.get("resolved", {}).items()) or "-"


def points_markdown(rows: list[dict]) -> list[str]:
    header = ["point", "strategy", "budget", "set by the budget", "compute ratio", "test top-1 (last)",
              "val top-1 (last)", "test top-1 (best epoch)", "wall s", "seeds"]
    body = []
    for r in rows:
        lead = [r["point"], FAMILIES[r["family"]]["label"], "-" if r["budget"] is None else f"{r['budget']:g}"]
        if r["status"] in ("unreachable", "not yet run"):
            why = r["reason"].split(";")[0] if r["reason"] else ""
            body.append(lead + [r["status"] + (f": {why}" if why else "")] + [""] * 6)
            continue
        body.append(lead + [_setting(r), f"{r['compute_ratio']:.3f}", _ms(r, "test"), _ms(r, "val"),
                            _ms(r, "test_best"), f"{r['wall_s']:.0f}", r["status"]])
    return md_table(header, body)


def _cell(r: Optional[dict]) -> str:
    """A point's mean test top-1 +- s.e. (compute ratio), marked when some seeds are missing; else its status."""
    if r is None:
        return "-"
    if not r.get("seeds_done"):
        return r["status"]
    return f"{_ms(r, 'test')} ({r['compute_ratio']:.2f})" + ("" if r["status"] == "done" else f" [{r['status']}]")


def budget_markdown(rows: list[dict], budgets) -> list[str]:
    """Budgets down, budgeted families across: mean last-epoch test top-1 +- s.e. (or why there is none)."""
    by = {(r["family"], r["budget"]): r for r in rows}
    body = []
    for b in sorted(budgets):
        cells = [_cell(by.get((fam, b))) for fam in BUDGETED]
        best = ranking(rows).get(b)
        body.append([f"{b:g}"] + cells + [FAMILIES[best[0]["family"]]["label"] if best else "-"])
    return md_table(["budget"] + [FAMILIES[f]["label"] for f in BUDGETED] + ["best"], body)


def headline_lines(rows: list[dict], target: float = 0.5) -> list[str]:
    done = complete(rows)
    lines = []
    for ref in ("kd", "kd-ls"):
        h = headline(rows, ref)
        if h is None:
            lines.append(f"headline against {FAMILIES[ref]['label']}: not available ({ref} not finished)")
            continue
        ran = {r["family"] for r in done.values()}
        parts = [f"{FAMILIES[f]['label']} {r['budget']:g} (compute {r['compute_ratio']:.3f}, {r['test']:.2f})" if r
                 else f"{FAMILIES[f]['label']} " + ("none of its finished budgets" if f in ran else "nothing finished")
                 for f, r in h.items()]
        lines.append(f"headline: smallest budget with mean test top-1 >= {FAMILIES[ref]['label']}'s "
                     f"{done[ref]['test']:.2f}: " + "; ".join(parts))
    h = headline(rows, "kd")
    if h is not None:
        lines.append(f"KCD target (budget <= {target:g} against KD): " + _target(h["kcd"], done, target))
    full = [r for r in done.values() if r["budget"] is None and r["point"] != "kd"]
    if "kd" in done and full:
        kd = done["kd"]["test"]
        lines.append(f"at full compute against KD's {kd:.2f}: " + "; ".join(
            f"{FAMILIES[r['family']]['label']} {r['test']:.2f} ({r['test'] - kd:+.2f})" for r in full))
    for b, rs in ranking(rows).items():
        lines.append(f"budget {b:g}: " + " > ".join(f"{FAMILIES[r['family']]['label']} {r['test']:.2f}" for r in rs))
    return lines


def _target(hit: Optional[dict], done: dict, target: float) -> str:
    """Met (at which budget), not met (every finished KCD budget up to the target is below KD), or not known yet."""
    if hit is not None and hit["budget"] <= target:
        return f"met at {hit['budget']:g}"
    ran = [r["budget"] for r in done.values() if r["family"] == "kcd" and r["budget"] <= target]
    if not ran:
        return "not known yet (no KCD budget <= the target finished)"
    return "NOT met" + (f" (first reached at {hit['budget']:g})" if hit else "") + \
        f"; finished KCD budgets <= the target: {', '.join(f'{b:g}' for b in sorted(ran))}"


def plot_rows(rows: list[dict]) -> list[dict]:
    """Rows for kcd_ray.plots.pareto_plot: each point with a finished seed, its family's look, the test-top-1
    Pareto front (on the means) flagged."""
    from kcd_ray.report.tables import pareto_flags

    pts = [r for r in rows if r.get("seeds_done")]
    out = [{"info": {"name": r["family"], "tag": r["family"], **FAMILIES[r["family"]]},
            "compute_ratio": r["compute_ratio"], "test_top1": r["test"], "test_top1_se": r["test_se"],
            "val_top1": r["val"], "val_top1_se": r["val_se"]} for r in pts]
    for row, flag in zip(out, pareto_flags([(r["compute_ratio"], r["test_top1"]) for r in out])):
        row["pareto"] = flag
    return out
