"""``selection.budget``: a run's target compute, as a fraction of plain KD's FLOPs over the same epochs, turned into
the parameter of its data-selection strategy before training. Pure code.

The compute of a run is the compute ledger's (:mod:`kcd_ray.engine.ledger`): each trained sample pays a student
forward and backward and its teacher's forward, each ranking pass a student forward (UNIXKD's candidates, KCD's
offline E-step). A strategy's planned shares of the training set per epoch (``planned_fractions``) give its
expected ratio for any value of its parameter (:func:`kcd_ray.engine.plan.derive.plan_compute`); the parameter a
budget sets is the strategy's ``budget_knobs`` (KCD: ``kcd.rho``, or ``kcd.stages`` with
``selection.budget_key``; random subsets: the fraction; InfoBatch: the prune ratio; UNIXKD: its ratio). The
expected ratio is monotone in it, so a bisection (an integer scan for stages) finds the value whose ratio is
closest to the budget. A budget no value reaches is one line naming ``selection.budget``, the reachable range and
the keys to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from kcd_ray.config import Config, ConfigError


TOLERANCE = 0.02  # how far past a strategy's reachable range a budget may be and still take that range's end


@dataclass(frozen=True)
class Knob:
    """A config key a budget may set: its range, whether it is an integer, and what else moves the reachable range."""

    key: str  # dotted config key, e.g. "kcd.rho"
    lo: float
    hi: float
    integer: bool = False
    hint: str = ""  # the keys that change what this knob can reach


def with_value(cfg: Config, key: str, value) -> Config:
    """``cfg`` with the dotted ``key`` set (sections are replaced, never mutated)."""
    parts = key.split(".")

    def put(obj, path):
        if len(path) == 1:
            return dataclasses.replace(obj, **{path[0]: value})
        child = getattr(obj, path[0])
        if not dataclasses.is_dataclass(child) or path[0] not in {f.name for f in dataclasses.fields(obj)}:
            # an open section's registered sub-section (selection.<strategy>)
            ext = dict(obj.extensions)
            ext[path[0]] = put(child, path[1:])
            return dataclasses.replace(obj, extensions=ext)
        return dataclasses.replace(obj, **{path[0]: put(child, path[1:])})

    return put(cfg, parts)


def _bisect(ratio: Callable[[float], float], knob: Knob, target: float, steps: int = 40) -> float:
    """The value in [lo, hi] whose ratio is closest to ``target``, for a ratio monotone in the value."""
    lo, hi = knob.lo, knob.hi
    rising = ratio(hi) >= ratio(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if (ratio(mid) < target) == rising:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda v: abs(ratio(v) - target))


def solve(ratio: Callable[[float], float], knob: Knob, target: float) -> float:
    if knob.integer:
        values = range(int(knob.lo), int(knob.hi) + 1)
        return min(values, key=lambda v: (abs(ratio(v) - target), v))
    return round(_bisect(ratio, knob, target), 6)


def resolve_budget(cfg: Config, strategy: type, knobs: list[Knob], ratio_of: Callable[[Config], float]) -> tuple:
    """(the config with the knob set, {key: value}, the planned ratio there) for ``cfg.selection.budget``;
    ``ratio_of(cfg)``: the planned compute ratio of a config."""
    budget, tolerance = cfg.selection.budget, TOLERANCE
    if not knobs:  # a strategy without a knob (plain KD) meets only the budget it runs at
        fixed = ratio_of(cfg)
        if abs(fixed - budget) <= tolerance:
            return cfg, {}, fixed
        raise ConfigError(f"selection.budget: {budget:g} is not what selection.strategy {strategy.name!r} runs at "
                          f"({fixed:.3f}) and it has no parameter to set; drop the budget, or pick a strategy with one "
                          "(kcd, random, infobatch, unixkd)")
    wanted = cfg.selection.budget_key
    knob = next((k for k in knobs if k.key == wanted), None) if wanted else knobs[0]
    if knob is None:
        raise ConfigError(f"selection.budget_key: {wanted!r} is not a key strategy {strategy.name!r} sets from a "
                          f"budget; one of: {', '.join(k.key for k in knobs)}")
    ratio = lambda v: ratio_of(with_value(cfg, knob.key, int(v) if knob.integer else v))  # noqa: E731
    lo, hi = sorted((ratio(knob.lo), ratio(knob.hi)))
    if budget < lo - tolerance:
        raise ConfigError(f"selection.budget: {budget:g} is below the smallest compute ratio {strategy.name} reaches "
                          f"by {knob.key} ({lo:.3f}, the range is {lo:.3f}..{hi:.3f}); raise selection.budget to at "
                          f"least {lo:.3f}" + (f", or change {knob.hint}" if knob.hint else ""))
    if budget > hi + tolerance:
        raise ConfigError(f"selection.budget: {budget:g} is above the largest compute ratio {strategy.name} reaches by "
                          f"{knob.key} ({hi:.3f}, the range is {lo:.3f}..{hi:.3f}); lower selection.budget to at most "
                          f"{hi:.3f}" + (f", or change {knob.hint}" if knob.hint else ""))
    if budget >= hi or budget <= lo:  # at or past an end: that end's value exactly (e.g. rho 1.0 for a budget 1)
        value = min((knob.lo, knob.hi), key=lambda v: abs(ratio(v) - budget))
    else:
        value = solve(ratio, knob, budget)
    value = int(value) if knob.integer else value
    return with_value(cfg, knob.key, value), {knob.key: value}, ratio(value)
