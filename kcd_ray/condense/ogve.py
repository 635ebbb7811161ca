"""E-step, part 2: Online Global Value Estimation (OGVE) -- per-sample value history and its score.

Per sample ``i`` the accumulator keeps ``S_i`` (sum of its per-epoch values) and ``n_i`` (the
number of epochs in which it was observed). Within one epoch, several observations of the same
sample (several workers, a repeated id, an offline pass plus the online one) are averaged into
ONE observation for that epoch, so ``n_i`` counts epochs, as in docs/methods/kcd.md §3.

``score_i = (n_i / n_ref) ** lam * S_i / n_i`` (frequency calibration). A sample that has never
been observed has ``n_i = 0`` and gets score 0: every registered value function is >= 0, so it
ranks with the least valuable samples (ties are broken by the M-step's seeded
permutation, :func:`kcd_ray.condense.vaks.tie_break_rng`).
"""

from __future__ import annotations

import numpy as np

MODES = ("multiple", "single")


def _as_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


class ValueAccumulator:
    """Sum/count of per-epoch values for ``num_samples`` samples.

    ``mode="multiple"`` (default) keeps the whole history; ``mode="single"`` keeps only the
    last finished epoch (samples not observed in it then have ``n = 0`` and score 0).
    """

    def __init__(self, num_samples: int, mode: str = "multiple", lam: float = 0.03, n_ref: float = 40.0):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples: expected >= 1, got {num_samples!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if not lam >= 0:
            raise ValueError(f"lam: expected >= 0, got {lam!r}")
        if not n_ref > 0:
            raise ValueError(f"n_ref: expected > 0, got {n_ref!r}")
        self.num_samples = int(num_samples)
        self.mode = mode
        self.lam = float(lam)
        self.n_ref = float(n_ref)
        self.sum = np.zeros(self.num_samples, np.float64)  # S_i
        self.count = np.zeros(self.num_samples, np.int64)  # n_i (epochs observed)
        self.epoch_sum = np.zeros(self.num_samples, np.float64)  # current epoch, not yet folded
        self.epoch_count = np.zeros(self.num_samples, np.int64)
        self.epochs_ended = 0

    # ------------------------------------------------------------------ observing
    def observe(self, ids, values) -> None:
        """Record instant values for samples ``ids`` in the current epoch (tensors or arrays)."""
        ids = _as_numpy(ids, np.int64)
        values = _as_numpy(values, np.float64)
        if ids.shape != values.shape:
            raise ValueError(f"observe: {ids.size} ids but {values.size} values")
        if ids.size == 0:
            return
        if ids.min() < 0 or ids.max() >= self.num_samples:
            raise ValueError(f"observe: sample ids must lie in [0, {self.num_samples}), "
                             f"got range [{ids.min()}, {ids.max()}]")
        if not np.isfinite(values).all():
            bad = ids[~np.isfinite(values)][:5].tolist()
            raise ValueError(f"observe: non-finite values for sample ids {bad} (diverged student?)")
        np.add.at(self.epoch_sum, ids, values)
        np.add.at(self.epoch_count, ids, 1)

    def epoch_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(sum, count) of the current epoch's raw observations: to ship from a worker."""
        return self.epoch_sum.copy(), self.epoch_count.copy()

    def add_totals(self, epoch_sum, epoch_count) -> None:
        """Merge another accumulator's :meth:`epoch_totals` into the current epoch."""
        s = _as_numpy(epoch_sum, np.float64)
        c = _as_numpy(epoch_count, np.int64)
        if s.size != self.num_samples or c.size != self.num_samples:
            raise ValueError(f"add_totals: expected arrays of {self.num_samples}, got {s.size} and {c.size}")
        if (c < 0).any() or not np.isfinite(s).all():
            raise ValueError("add_totals: counts must be >= 0 and sums finite")
        self.epoch_sum += s
        self.epoch_count += c

    @property
    def pending(self) -> int:
        """Number of raw observations in the current (unfinished) epoch."""
        return int(self.epoch_count.sum())

    def end_epoch(self) -> int:
        """Fold the current epoch into (S, n); returns how many samples were observed in it."""
        seen = self.epoch_count > 0
        epoch_mean = np.zeros(self.num_samples, np.float64)
        epoch_mean[seen] = self.epoch_sum[seen] / self.epoch_count[seen]
        if self.mode == "multiple":
            self.sum[seen] += epoch_mean[seen]
            self.count[seen] += 1
        else:  # single: only the last epoch counts
            self.sum = epoch_mean
            self.count = seen.astype(np.int64)
        self.epoch_sum[:] = 0.0
        self.epoch_count[:] = 0
        self.epochs_ended += 1
        return int(seen.sum())

    # ------------------------------------------------------------------ reading
    def mean(self) -> np.ndarray:
        """Vbar_i = S_i / n_i; NaN for a sample never observed."""
        out = np.full(self.num_samples, np.nan)
        seen = self.count > 0
        out[seen] = self.sum[seen] / self.count[seen]
        return out

    def scores(self) -> np.ndarray:
        """(n_i / n_ref)^lam * S_i / n_i; 0 for a sample never observed."""
        out = np.zeros(self.num_samples, np.float64)
        seen = self.count > 0
        n = self.count[seen].astype(np.float64)
        out[seen] = (n / self.n_ref) ** self.lam * (self.sum[seen] / n)
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "mode": self.mode,
            "lam": self.lam,
            "n_ref": self.n_ref,
            "sum": self.sum.copy(),
            "count": self.count.copy(),
            "epoch_sum": self.epoch_sum.copy(),
            "epoch_count": self.epoch_count.copy(),
            "epochs_ended": self.epochs_ended,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the history. ``lam`` and ``n_ref`` stay this object's (they only affect scoring);
        a different sample count or mode is an error, because the stored sums would mean something else."""
        if not isinstance(state, dict):
            raise ValueError(f"accumulator state: expected a dict, got {type(state).__name__}")
        missing = [k for k in ("num_samples", "mode", "sum", "count", "epoch_sum", "epoch_count") if k not in state]
        if missing:
            raise ValueError(f"accumulator state: missing keys {missing}")
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"accumulator state: saved for {state['num_samples']} samples, "
                             f"this run has {self.num_samples}")
        if state["mode"] != self.mode:
            raise ValueError(f"accumulator state: saved with mode {state['mode']!r}, this run uses {self.mode!r}")
        arrays = {}
        for key, dtype in (("sum", np.float64), ("count", np.int64), ("epoch_sum", np.float64),
                           ("epoch_count", np.int64)):
            a = np.asarray(state[key])
            if a.shape != (self.num_samples,):
                raise ValueError(f"accumulator state: {key} has shape {a.shape}, expected ({self.num_samples},)")
            arrays[key] = a.astype(dtype, copy=True)
        if (arrays["count"] < 0).any() or (arrays["epoch_count"] < 0).any():
            raise ValueError("accumulator state: negative counts")
        for key, a in arrays.items():
            setattr(self, key, a)
        self.epochs_ended = int(state.get("epochs_ended", 0))
