"""The whole KCD E/M state of one run, with checkpointing and the Parquet mask table.

Where the EM loop lives:

* **E-step** (every epoch): the trainer computes instant values with a function from
  :mod:`kcd_ray.condense.values` and feeds them to :meth:`KCDState.observe`; :meth:`KCDState.end_epoch`
  folds the epoch into the global history (:class:`~kcd_ray.condense.ogve.ValueAccumulator`).
* **M-step** (at the start of a condensation epoch): :meth:`KCDState.maybe_condense` turns the
  calibrated scores into a new kept set (:func:`~kcd_ray.condense.vaks.select`, score ties broken
  by a permutation seeded from ``(seed, stage)``: :func:`~kcd_ray.condense.vaks.tie_break_rng`) and a summary
  plan (:func:`~kcd_ray.condense.vaks.summary_plan`), bumps the mask version and records the
  per-sample blend bookkeeping. Applying the blends to images is the data layer's job.

Typical loop::

    for epoch in range(start, epochs):
        result = state.maybe_condense(epoch)   # M-step (None on most epochs)
        if result: publish(result)             # new mask + overlay for the data pipeline
        train one epoch on state.kept_ids(); state.observe(ids, values) per batch
        state.end_epoch()                      # E-step bookkeeping
        checkpoint(state.state_dict())
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kcd_ray.condense.ogve import ValueAccumulator
from kcd_ray.condense.schedule import CondensationSchedule
from kcd_ray.condense.vaks import select, summary_plan, tie_break_rng

STATE_FORMAT = "kcd_ray.kcd_state/1"
MASK_COLUMNS = {"sample_id": pa.int64(), "score": pa.float64(), "kept": pa.bool_(), "partner_id": pa.int64(),
                "mix_weight": pa.float64(), "stage": pa.int64()}
_PARAMS = ("enabled", "mode", "lam", "n_ref", "interval", "warmup", "rho", "stages", "shape", "summary", "lam_min",
           "seed")


def read_mask(path) -> pa.Table:
    """Read a mask table written by :meth:`KCDState.write_mask`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KCD mask file {path} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"KCD mask file {path}: not a readable Parquet file ({e})") from None
    for col, typ in MASK_COLUMNS.items():
        if col not in table.column_names:
            raise ValueError(f"KCD mask file {path}: missing column {col!r}; has {table.column_names}")
        if table.schema.field(col).type != typ:
            raise ValueError(f"KCD mask file {path}: column {col!r} is {table.schema.field(col).type}, expected {typ}")
    return table


def mask_version(table: pa.Table) -> int:
    """The mask version stored in a :meth:`KCDState.mask_table` (0 when absent)."""
    meta = table.schema.metadata or {}
    return int(meta.get(b"kcd_mask_version", b"0"))


@dataclass
class CondensationResult:
    """What one M-step decided. ``kept_ids`` sorted by id; ``tail/lost/weights`` in rank order."""

    epoch: int
    stage: int
    version: int
    k_old: int
    k_new: int
    kept_ids: np.ndarray
    ranking: np.ndarray
    scores: np.ndarray
    tail_ids: np.ndarray
    lost_ids: np.ndarray
    weights: np.ndarray


class KCDState:
    def __init__(self, num_samples: int, *, enabled: bool = True, mode: str = "multiple", lam: float = 0.03,
                 n_ref: float = 40.0, interval: int = 40, warmup: int = 0, rho: float = 0.7, stages: int = 6,
                 shape: str = "step", summary: bool = True, lam_min: float = 0.7, seed: int = 0):
        """``seed`` (``kcd.seed``) seeds the tie-break permutation of every condensation (with the stage)."""
        n = int(num_samples)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"kcd.seed: expected an integer, got {seed!r}")
        self.params = dict(enabled=bool(enabled), mode=mode, lam=float(lam), n_ref=float(n_ref), interval=int(interval),
                           warmup=int(warmup), rho=float(rho), stages=int(stages), shape=shape, summary=bool(summary),
                           lam_min=float(lam_min), seed=int(seed))
        self.seed = int(seed)
        if not 0.0 <= lam_min <= 1.0:
            raise ValueError(f"kcd.lam_min: expected 0..1, got {lam_min!r}")
        self.num_samples = n
        self.accumulator = ValueAccumulator(n, mode=mode, lam=lam, n_ref=n_ref)
        self.schedule = CondensationSchedule(n, rho=rho, stages=stages, interval=interval, warmup=warmup, shape=shape)
        self.stage = 0  # condensations done so far
        self.k = n  # current kept size
        self.version = 0  # mask version; 0 = everything kept
        self.last_condense_epoch = -1
        self.kept = np.ones(n, bool)
        self.scores = np.zeros(n, np.float64)  # scores used by the last M-step
        self.partner_id = np.full(n, -1, np.int64)  # latest blend partner (-1: never blended)
        self.mix_weight = np.ones(n, np.float64)  # latest own-image weight (1.0: never blended)
        self.blend_stage = np.full(n, -1, np.int64)  # stage of the latest blend (-1: never blended)

    @classmethod
    def from_config(cls, kcd_cfg, num_samples: int) -> "KCDState":
        """Build from a :class:`kcd_ray.config.KCDConfig` (or anything with the same attributes)."""
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        return cls(num_samples, **{k: getattr(kcd_cfg, k, defaults[k]) for k in _PARAMS})

    @property
    def enabled(self) -> bool:
        return self.params["enabled"]

    # ------------------------------------------------------------------ E-step
    def observe(self, ids, values) -> None:
        """Record instant values (also when KCD is disabled: the values can still be logged)."""
        self.accumulator.observe(ids, values)

    def end_epoch(self) -> int:
        return self.accumulator.end_epoch()

    # ------------------------------------------------------------------ M-step
    def maybe_condense(self, epoch: int, universe=None) -> CondensationResult | None:
        """Run the M-step if ``epoch`` is a condensation epoch, else return None.

        Idempotent per epoch: after a resume, calling it again for an epoch that already
        condensed (or an earlier one) returns None. Disabled KCD (plain KD) always returns None.

        ``universe`` (bool[N], optional: a curriculum's active classes) restricts the condensation to the
        samples in it that have values: the sizes follow the schedule on that count, and every other sample is
        kept as it is (not ranked against them). A group that just joined is kept whole until it has values.
        """
        epoch = int(epoch)
        if not self.enabled or not self.schedule.is_condense_epoch(epoch) or epoch <= self.last_condense_epoch:
            return None
        if self.accumulator.pending:
            raise RuntimeError("KCDState.maybe_condense: the current epoch has observations that were not folded in; "
                               "call end_epoch() after each epoch, before condensing")
        scores = self.accumulator.scores()
        stage, k_old = self.stage + 1, self.k
        if universe is None:
            k_new = self.schedule.next_size(k_old, stage)
        else:
            scores, k_old, k_new = self._within(universe, scores, stage)
        # Ties (equal scores) break by a permutation seeded from (seed, stage): reproducible on resume.
        ranking, kept_ids = select(scores, k_new, tie_break_rng(self.seed, stage))
        if self.params["summary"]:
            tail, lost, weights = summary_plan(ranking, k_old, k_new, self.params["lam_min"])
        else:
            tail, lost, weights = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        self.kept = np.zeros(self.num_samples, bool)
        self.kept[kept_ids] = True
        self.partner_id[tail] = lost
        self.mix_weight[tail] = weights
        self.blend_stage[tail] = stage
        self.scores = scores
        self.stage, self.k, self.last_condense_epoch = stage, k_new, epoch
        self.version += 1
        return CondensationResult(epoch, stage, self.version, k_old, k_new, kept_ids, ranking, scores, tail, lost,
                                  weights)

    def _within(self, universe, scores: np.ndarray, stage: int) -> tuple[np.ndarray, int, int]:
        """Scores and (k_old, k_new) for a condensation inside ``universe``: the samples outside it (or never
        valued) rank first (kept samples above dropped ones), so the top ``k_new`` keep every kept one of
        them and the schedule's size of the valued universe."""
        u = np.asarray(universe, dtype=bool).reshape(-1)
        if u.shape != (self.num_samples,):
            raise ValueError(f"maybe_condense: universe has {u.size} entries for {self.num_samples} samples")
        u = u & (self.accumulator.count > 0)
        n_u = int(u.sum())
        if n_u == 0:  # nothing valued yet: the same kept set
            return self.kept.astype(np.float64), self.k, self.k
        p = self.params
        sched = CondensationSchedule(n_u, rho=p["rho"], stages=p["stages"], interval=p["interval"],
                                     warmup=p["warmup"], shape=p["shape"])
        k_in_old = int((self.kept & u).sum())
        k_in_new = sched.next_size(k_in_old, stage)
        outside_kept = int((self.kept & ~u).sum())
        top = float(scores[u].max()) + 1.0
        ranked = np.where(u, scores, np.where(self.kept, top + 1.0, -1.0))
        return ranked, outside_kept + k_in_old, outside_kept + k_in_new

    def kept_ids(self) -> np.ndarray:
        return np.flatnonzero(self.kept).astype(np.int64)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain dict of numpy arrays and scalars (picklable; safe for torch.save)."""
        return {
            "format": STATE_FORMAT,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "params": dict(self.params),
            "accumulator": self.accumulator.state_dict(),
            "stage": self.stage,
            "k": self.k,
            "version": self.version,
            "last_condense_epoch": self.last_condense_epoch,
            "kept": self.kept.copy(),
            "scores": self.scores.copy(),
            "partner_id": self.partner_id.copy(),
            "mix_weight": self.mix_weight.copy(),
            "blend_stage": self.blend_stage.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. The hyperparameters stay this object's (the run's config),
        except the tie-break ``seed``: it is restored from the state (0 for a state dict written
        before it was stored), so a resumed run breaks ties exactly as the run that saved it.
        A different sample count, a missing key or an inconsistent array is a ValueError."""
        if not isinstance(state, dict):
            raise ValueError(f"KCD state: expected a dict, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"KCD state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        missing = [k for k in ("num_samples", "accumulator", "stage", "k", "version", "last_condense_epoch", "kept",
                               "scores", "partner_id", "mix_weight", "blend_stage") if k not in state]
        if missing:
            raise ValueError(f"KCD state: missing keys {missing}")
        n = self.num_samples
        if int(state["num_samples"]) != n:
            raise ValueError(f"KCD state: saved for {state['num_samples']} samples, this data set has {n}")
        arrays = {}
        for key, dtype in (("kept", bool), ("scores", np.float64), ("partner_id", np.int64),
                           ("mix_weight", np.float64), ("blend_stage", np.int64)):
            a = np.asarray(state[key])
            if a.shape != (n,):
                raise ValueError(f"KCD state: {key} has shape {a.shape}, expected ({n},)")
            arrays[key] = a.astype(dtype, copy=True)
        seed = state.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"KCD state: seed must be an integer, got {seed!r}")
        k = int(state["k"])
        if int(arrays["kept"].sum()) != k:
            raise ValueError(f"KCD state: k={k} but the kept mask holds {int(arrays['kept'].sum())} samples")
        if ((arrays["partner_id"] < -1) | (arrays["partner_id"] >= n)).any():
            raise ValueError(f"KCD state: partner_id outside -1..{n - 1}")
        acc = ValueAccumulator(n, self.accumulator.mode, self.accumulator.lam, self.accumulator.n_ref)
        acc.load_state_dict(state["accumulator"])  # validates before anything is replaced
        self.accumulator = acc
        for key, a in arrays.items():
            setattr(self, key, a)
        self.stage, self.k, self.version = int(state["stage"]), k, int(state["version"])
        self.last_condense_epoch = int(state["last_condense_epoch"])
        self.seed = self.params["seed"] = int(seed)

    # ------------------------------------------------------------------ mask table
    def mask_table(self) -> pa.Table:
        """One row per sample: sample_id, score, kept, partner_id, mix_weight, stage (of the latest blend)."""
        meta = {b"kcd_mask_version": str(self.version).encode(), b"kcd_stage": str(self.stage).encode()}
        schema = pa.schema([pa.field(c, t) for c, t in MASK_COLUMNS.items()], metadata=meta)
        cols = [np.arange(self.num_samples, dtype=np.int64), self.scores, self.kept, self.partner_id,
                self.mix_weight, self.blend_stage]
        return pa.Table.from_arrays([pa.array(c, type=t) for c, t in zip(cols, MASK_COLUMNS.values())], schema=schema)

    def write_mask(self, path) -> Path:
        """Write :meth:`mask_table` to Parquet atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(self.mask_table(), tmp)
        os.replace(tmp, path)
        return path

    read_mask = staticmethod(read_mask)
