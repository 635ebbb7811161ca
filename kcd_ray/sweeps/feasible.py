"""Which sweep points can meet their compute budget, decided before any trial starts. Pure code.

A grid over ``selection.budget`` x ``selection.strategy`` crosses strategies with budgets some cannot reach (plain
KD runs at 1.0; InfoBatch saves at most about its prune ratio times half the set, over its pruning epochs). Each
point's budget is resolved as its run would resolve it (``kcd_ray.engine.plan.derive.apply_budget``, on the base
run's data set and measured FLOPs); a grid keeps the points that resolve and lists the others with the reason. A
sampled point (random, optuna, or a grid crossed with sampled keys) that cannot meet its budget ends its trial
with that reason instead of a run.
"""

from __future__ import annotations

import itertools
from typing import Optional

from kcd_ray.config import ConfigError, config_from_dict
from kcd_ray.sweeps.space import Dim, apply_values

BUDGET_KEY = "selection.budget"


def budget_problem(cfg, kind: str, data, flops: tuple) -> Optional[str]:
    """Why ``cfg``'s ``selection.budget`` cannot be met (the one-line error a run would stop with); None when it
    can, or when it has no budget."""
    from kcd_ray.engine.plan.derive import apply_budget

    try:
        apply_budget(cfg, kind, data, flops)
    except ConfigError as err:
        if str(err).startswith(("selection.budget", "selection.teacher_paid")):
            return str(err)
        raise
    return None


def has_budget(dims: list[Dim], base: dict) -> bool:
    """Whether the sweep's points carry a budget (in the space, or in the base config)."""
    return any(d.key.startswith(BUDGET_KEY) for d in dims) or (base.get("selection") or {}).get("budget") is not None


def grid_points(dims: list[Dim]) -> list[dict]:
    """Every combination of the grid dimensions, as {key: value}, in Tune's grid order (the last key fastest)."""
    grid = [d for d in dims if d.kind == "grid"]
    return [dict(zip((d.key for d in grid), combo)) for combo in itertools.product(*(d.values for d in grid))]


def feasible_grid(dims: list[Dim], base: dict, kind: str, data, flops: tuple) -> tuple[list[dict], list[tuple]]:
    """(grid points whose budget can be met, [(point, reason)] of those that cannot), for a space of grid
    dimensions only (a sampled value could move what a point reaches: such sweeps decide in each trial)."""
    if any(d.kind != "grid" for d in dims):
        raise ValueError("feasible_grid: a space of grid dimensions only")
    kept, skipped = [], []
    for point in grid_points(dims):
        cfg = config_from_dict(apply_values(base, point))
        why = budget_problem(cfg, kind, data, flops)
        if why is None:
            kept.append(point)
        else:
            skipped.append((point, why))
    return kept, skipped


def point_label(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


__all__ = ["BUDGET_KEY", "budget_problem", "feasible_grid", "grid_points", "has_budget", "point_label"]
