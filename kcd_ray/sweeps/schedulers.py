"""A sweep's schedulers: ASHA early stopping, or Population Based Training over the space."""

from __future__ import annotations

from typing import Any

from kcd_ray.errors import ConfigError
from kcd_ray.sweeps.metrics import check_metric, default_metric, is_epoch_metric

PBT_KEYS = ("interval", "metric", "mode", "quantile", "resample_probability", "mutate")
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t", "metric", "mode")


def metric_mode(metric: str, sweep_metric: str, sweep_mode: str) -> str:
    """The direction a scheduler's metric improves in: the sweep's mode for the sweep's own metric, else min for a
    loss or a compute figure and max for an accuracy."""
    if metric == sweep_metric:
        return sweep_mode
    return "min" if metric.endswith("loss") or "compute" in metric or "flops" in metric else "max"


def _with_mode(out: dict, key: str, where: str, metric: str, mode: str) -> dict:
    out["mode"] = out.get("mode") or metric_mode(out["metric"], metric, mode)
    if out["mode"] not in ("max", "min"):
        raise _err(where, f"{key}.mode: {out['mode']!r} is not one of: max, min")
    return out


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _parse_asha(asha: Any, base: dict, where: str, metric: str, mode: str, select_on_test: bool) -> dict | None:
    """ASHA early stopping on a per-epoch metric (the sweep's own by default)."""
    if asha in (False, None):
        return None
    if asha is True:
        asha = {}
    if not isinstance(asha, dict):
        raise _err(where, f"asha: expected true/false or a mapping of {', '.join(ASHA_KEYS)}, got {asha!r}")
    for k in asha:
        if k not in ASHA_KEYS:
            raise _err(where, f"asha.{k}: unknown key; allowed: {', '.join(ASHA_KEYS)}")
    epochs = base["optim"]["epochs"]
    out = {"metric": metric, "grace_period": 1, "reduction_factor": 2, "max_t": epochs, **asha}
    if not (isinstance(out["grace_period"], int) and 0 < out["grace_period"] <= out["max_t"]):
        raise _err(where, f"asha.grace_period: expected an integer in 1..max_t ({out['max_t']}), "
                          f"got {out['grace_period']!r}")
    if not (isinstance(out["reduction_factor"], (int, float)) and out["reduction_factor"] > 1):
        raise _err(where, f"asha.reduction_factor: expected a number > 1, got {out['reduction_factor']!r}")
    check_metric(out["metric"], "asha.metric", where, base, select_on_test, per_epoch=True)
    return _with_mode(out, "asha", where, metric, mode)


def parse_schedulers(raw: dict, base: dict, dims: list, baseline: bool, where: str, metric: str,
                     select_on_test: bool, mode: str = "max") -> tuple:
    """(asha, pbt): at most one of them; PBT without the fixed KD baseline trial. Their metric defaults to the
    sweep's (a per-epoch one: the summary's final_* become their per-epoch names) and their mode to the direction
    that metric improves in (``metric_mode``)."""
    metric = {"final_val_top1": "val_top1", "final_top1": "top1"}.get(metric, metric)
    if not is_epoch_metric(metric):  # e.g. compute_ratio: the default per-epoch metric, in its own direction
        metric = default_metric(base, select_on_test)
        mode = metric_mode(metric, "", mode)
    asha = _parse_asha(raw.get("asha", False), base, where, metric, mode, select_on_test)
    budget = any(d.key.startswith("selection.budget") for d in dims) or \
        (base.get("selection") or {}).get("budget") is not None
    if raw.get("pbt") not in (False, None) and budget:
        raise _err(where, "pbt and selection.budget: a budget sets its strategy's parameter once, before training, and "
                          "PBT's perturbations change a trial's config mid-run, so no trial would keep to its budget; "
                          "sweep budgets with grid, random or optuna search")
    pbt = _parse_pbt(raw.get("pbt", False), base, dims, where, metric, mode, select_on_test)
    if pbt and asha:
        raise _err(where, "pbt and asha: pick one scheduler")
    if pbt and baseline:
        raise _err(where, "pbt and include_kd_baseline: the baseline would join the population and be exploited; "
                          "run plain KD as its own sweep or run")
    return asha, pbt


def _parse_pbt(pbt: Any, base: dict, dims: list, where: str, metric: str, mode: str,
               select_on_test: bool) -> dict | None:
    """Population Based Training: every ``interval`` epochs the bottom ``quantile`` of trials copy a top trial's
    checkpoint (weights, optimiser and the whole KCD state) and perturb the ``mutate`` keys of the space."""
    if pbt in (False, None):
        return None
    pbt = {} if pbt is True else pbt
    if not isinstance(pbt, dict):
        raise _err(where, f"pbt: expected true/false or a mapping of {', '.join(PBT_KEYS)}, got {pbt!r}")
    for k in pbt:
        if k not in PBT_KEYS:
            raise _err(where, f"pbt.{k}: unknown key; allowed: {', '.join(PBT_KEYS)}")
    keys = [d.key for d in dims]
    out = {"interval": 2, "metric": metric, "quantile": 0.25, "resample_probability": 0.25, "mutate": keys, **pbt}
    if not (isinstance(out["interval"], int) and 0 < out["interval"] < base["optim"]["epochs"]):
        raise _err(where, f"pbt.interval: expected an integer in 1..optim.epochs-1 ({base['optim']['epochs'] - 1}), "
                          f"got {out['interval']!r}")
    if not (isinstance(out["quantile"], (int, float)) and 0 < out["quantile"] <= 0.5):
        raise _err(where, f"pbt.quantile: expected a fraction in (0, 0.5], got {out['quantile']!r}")
    check_metric(out["metric"], "pbt.metric", where, base, select_on_test, per_epoch=True)
    bad = [k for k in out["mutate"] if k not in keys]
    if bad or not out["mutate"]:
        raise _err(where, f"pbt.mutate: {bad or out['mutate']!r}: expected keys of space "
                          f"({', '.join(keys) or 'empty'})")
    if base["scaling"]["num_workers"] != 0:
        raise _err(where, "pbt: needs in-process trials (scaling.num_workers=0): trials hand each other their "
                          "checkpoints through Tune")
    kcd_on = base["kcd"]["enabled"] or (base.get("selection") or {}).get("strategy") == "kcd"
    if kcd_on and base["kcd"]["summary"]:
        raise _err(where, "pbt: set kcd.summary=false: KCD's summary blends live in each trial's run folder and do "
                          "not travel with an exploited checkpoint")
    return _with_mode(out, "pbt", where, metric, mode)
