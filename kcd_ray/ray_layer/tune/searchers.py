"""Searcher wrappers (imported only when a sweep runs: ray.tune is slow to import)."""

from __future__ import annotations

import copy
import pickle
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

    def _is_baseline(self, trial_id, result) -> bool:
        config = (result or {}).get("config") or {}
        return trial_id == self.baseline_id or config.get("variant") == "kd"

    def on_trial_result(self, trial_id, result):
        if not self._is_baseline(trial_id, result):
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if not self._is_baseline(trial_id, result):
            self.inner.on_trial_complete(trial_id, result=result, error=error)

    # One checkpoint file holding both states: Tune saves to a temporary name and renames it, and
    # restores the searcher object from the Tuner's pickle, as it was when the sweep started.
    def save(self, checkpoint_path):
        inner = Path(checkpoint_path + ".inner")
        self.inner.save(str(inner))
        state = {"inner": inner.read_bytes(), "baseline_id": self.baseline_id}
        inner.unlink()
        Path(checkpoint_path).write_bytes(pickle.dumps(state))

    def restore(self, checkpoint_path):
        state = pickle.loads(Path(checkpoint_path).read_bytes())
        inner = Path(checkpoint_path + ".inner")
        inner.write_bytes(state["inner"])
        try:
            self.inner.restore(str(inner))
        finally:
            inner.unlink()
        self.baseline_id = state["baseline_id"]
