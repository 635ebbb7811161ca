"""Searcher wrappers (imported only when a sweep runs: ray.tune is slow to import)."""

from __future__ import annotations

import copy
from pathlib import Path

from ray.tune.search import Searcher


class BaselineFirst(Searcher):
    """Wraps a Tune Searcher: the first suggestion is the plain-KD baseline, the rest come from the searcher.

    The baseline's result is kept from the wrapped searcher, which models only the searched space.
    """

    def __init__(self, searcher: Searcher, point: dict):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.inner, self.point, self.baseline_id = searcher, point, None

    def set_search_properties(self, metric, mode, config, **spec):
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent):
        return self.inner.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id):
        if self.baseline_id is None:
            self.baseline_id = trial_id
            return copy.deepcopy(self.point)
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id, result):
        if trial_id != self.baseline_id:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id != self.baseline_id:
            self.inner.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path):
        self.inner.save(checkpoint_path)
        Path(checkpoint_path + ".baseline").write_text(self.baseline_id or "")

    def restore(self, checkpoint_path):
        self.inner.restore(checkpoint_path)
        marker = Path(checkpoint_path + ".baseline")
        if marker.exists():
            self.baseline_id = marker.read_text() or None
