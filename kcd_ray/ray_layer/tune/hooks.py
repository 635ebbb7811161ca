"""The engine hook an in-process sweep trial (``scaling.num_workers=0``) reports to Tune through.

Ray Train runs no callbacks in-process, so the ``TuneReportCallback`` a trial with Train workers uses never
fires. The engine's own hook point reports instead: after each epoch's checkpoint, the same row the engine
hands ``Services.report``, on the trial's thread (where ``ray.tune.report`` works). Schedulers such as ASHA
so get one result per epoch, as with Train workers.

Its own module because it imports the engine (and torch): ``sweep`` imports it only inside a trial.
"""

from __future__ import annotations

from kcd_ray.engine.hooks import HOOKS, Hook

TUNE_REPORT = "tune_report"


def reportable(row: dict) -> dict:
    """The part of a metrics row that is reported (the engine's own filter in ``Engine.run``)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str)) and v is not None}


@HOOKS.register(TUNE_REPORT)
class TuneReport(Hook):
    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        if engine.ctx.is_chief:
            from ray import tune

            tune.report(reportable(row))
