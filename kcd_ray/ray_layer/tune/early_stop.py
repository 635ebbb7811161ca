"""ASHA that leaves a note in each run folder it stops early, so a stop by the scheduler is never taken for a
Ctrl-C: Tune reports both as TERMINATED, and both leave the trial's status.json saying ``running`` (Tune ends the
trial's process before its own ``fit`` can say anything)."""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from kcd_ray import storage
from kcd_ray.report.runs import STOPPED_NOTE


class NotingASHA(ASHAScheduler):
    """Ray Tune's ASHA (``ASHAScheduler``); a STOP decision also writes ``stopped_early.json`` into the trial's run
    folder, ``run_folder(trial)`` naming it (pickled with the scheduler, so a restored sweep keeps it)."""

    def __init__(self, *, run_folder, **kwargs):
        super().__init__(**kwargs)
        self._run_folder = run_folder

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            note = {"epoch": result.get(self._time_attr), "metric": self._metric, "value": result.get(self._metric)}
            storage.write_text(storage.join(self._run_folder(trial), STOPPED_NOTE), json.dumps(note))
        return decision


__all__ = ["NotingASHA", "STOPPED_NOTE"]
