"""What a sweep may select on: the metrics its trials report, which of them are test figures, and the checks.

A trial reports to Tune the numeric columns of each epoch's metrics row, which the engine and every registered
part declare (``kcd_ray.engine.assemble.epoch_columns``: the engine's own, the compute ledger's, a strategy's or
curriculum's, one ``loss_<term>`` per loss term), and once more at its end the run summary's figures
(``kcd_ray.ray_layer.tune.sweep._trial``). Choosing trials on a test figure inflates every reported number, so a
sweep selects on validation (``val_*``, with ``data.val_fraction`` in its base recipe); a test metric is refused
unless the sweep says ``select_on_test: true`` (and the report then says so).
"""

from __future__ import annotations

from kcd_ray.errors import ConfigError

SUMMARY_KEYS = ("final_top1", "final_top5", "best_top1", "best_epoch", "compute_ratio", "sample_passes",
                "full_sample_passes", "wall_seconds", "sample_pass_ratio", "flops_total", "full_flops",
                "final_val_top1", "best_val_top1", "selected_top1", "selected_val_top1", "planned_compute_ratio")
LOSS_PREFIX = "loss_"
# Figures measured on the test split: a sweep may not choose by them unless it says select_on_test
TEST_METRICS = ("top1", "top5", "test_loss", "best_top1", "final_top1", "final_top5", "selected_top1")
VALIDATION_PREFIX = "val_"


def epoch_metrics() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from kcd_ray.engine.assemble import epoch_columns

    return epoch_columns()


def is_epoch_metric(name: str) -> bool:
    """Reported after every epoch (what ASHA can stop on)."""
    names, prefixes = epoch_metrics()
    return name in names or any(name.startswith(p) and len(name) > len(p) for p in prefixes)


def is_reported_metric(name: str) -> bool:
    return name in SUMMARY_KEYS or is_epoch_metric(name)


def needs_validation(name: str) -> bool:
    return name.startswith(VALIDATION_PREFIX) or name in ("final_val_top1", "best_val_top1", "selected_val_top1")


def _metric_list(names) -> str:
    return ", ".join(sorted(names)) + f", {LOSS_PREFIX}<term> (a loss term: loss_kd, loss_ce, ...)"


def epoch_metric_list() -> str:
    return _metric_list(epoch_metrics()[0])


def reported_metric_list() -> str:
    return _metric_list(dict.fromkeys(epoch_metrics()[0] + SUMMARY_KEYS))


def check_metric(name, key: str, where: str, base: dict, select_on_test: bool, per_epoch: bool = False) -> str:
    """``name`` checked as what the sweep's ``key`` selects on: reported (every epoch, for a scheduler), not a test
    figure unless ``select_on_test``, and a validation figure only with a validation split in the base recipe."""
    ok = isinstance(name, str) and (is_epoch_metric(name) if per_epoch else is_reported_metric(name))
    if not ok:
        what = "every epoch" if per_epoch else ""
        listing = epoch_metric_list() if per_epoch else reported_metric_list()
        raise ConfigError(f"{where}: {key}: {name!r} is not a metric the runs report {what}".rstrip()
                          + f"; one of: {listing}")
    if name in TEST_METRICS and not select_on_test:
        raise ConfigError(f"{where}: {key}: {name!r} is measured on the test split, and choosing trials on it "
                          "overstates every reported figure; select on validation (val_top1, with data.val_fraction "
                          "in the base recipe), or say select_on_test: true")
    if needs_validation(name) and not base["data"].get("val_fraction"):
        raise ConfigError(f"{where}: {key}: {name!r} needs a validation split and the base recipe has none: set "
                          "data.val_fraction (e.g. 0.1) in it or in overrides")
    return name


def default_metric(base: dict, select_on_test: bool) -> str:
    """The last epoch's validation top-1; the test top-1 only for a sweep that says select_on_test and has no
    validation split."""
    return "top1" if select_on_test and not base["data"].get("val_fraction") else "val_top1"
