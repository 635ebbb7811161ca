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
    """``checkpoint=True`` (Population Based Training): each report carries the run checkpoint the engine just
    wrote (model, optimiser, scheduler, every hook's state: KCD's whole state), which Tune hands to the trials
    that exploit this one."""

    def __init__(self, checkpoint: bool = False):
        self.checkpoint = bool(checkpoint)

    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        if not engine.ctx.is_chief:
            return
        from ray import tune

        if not self.checkpoint:
            tune.report(reportable(row))
            return
        from kcd_ray.ray_layer.worker import local_checkpoint_dir

        result = {**reportable(row), "run_dir": str(engine.ctx.run_dir.path)}  # a PBT trial sends no final result
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(local_checkpoint_dir(engine.ctx.run_dir))))
