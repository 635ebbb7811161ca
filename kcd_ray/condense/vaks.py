"""M-step: selection and Value-Adaptive Knowledge Summary (VAKS), docs/methods/kcd.md §5-§6.

Pure numpy. :func:`rank` / :func:`select` pick the top-``K_new`` samples by score, ties broken
by a permutation drawn from :func:`tie_break_rng` ``(seed, stage)`` in the M-step;
:func:`summary_plan` says which kept image absorbs which dropped one and with what weight;
:func:`blend_uint8` is THE pixel blend -- the Ray Data overlay writer calls this same
function, so the core and the pipeline cannot disagree on rounding.
"""

from __future__ import annotations

import numpy as np


def _scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(s).all():
        raise ValueError(f"scores: {int((~np.isfinite(s)).sum())} non-finite entries")
    return s


def tie_break_rng(seed: int, stage: int) -> np.random.Generator:
    """The generator whose permutation breaks score ties at condensation ``stage`` (1, 2, ...) of a run
    with ``kcd.seed`` ``seed``: ``np.random.default_rng([seed mod 2**64, stage])``.

    A fresh generator per stage, so a resumed run (or any process) re-creates exactly the draw of
    the original run from two integers, without storing generator state.
    """
    if int(stage) < 0:
        raise ValueError(f"stage: expected >= 0, got {stage!r}")
    return np.random.default_rng([int(seed) % (1 << 64), int(stage)])


def rank(scores, rng: np.random.Generator | None = None) -> np.ndarray:
    """Sample ids sorted by score, descending; ties broken by a permutation drawn from ``rng``.

    The M-step (:meth:`kcd_ray.condense.state.KCDState.maybe_condense`) always passes
    :func:`tie_break_rng` ``(seed, stage)``, so equal scores (an ``acc`` / ``acc_teacher`` value
    function, never-observed samples, KCD on a converged student) are kept or dropped by a seeded,
    reproducible draw rather than systematically in favour of small ids.

    ``rng=None`` is kept as a deterministic *reference* order (ties by smaller id first) for
    analysis and tests that need a closed-form answer; it must not be used to condense a run, since
    it biases the kept set towards low sample ids (e.g. towards the first classes of a data set
    stored in class order).
    """
    s = _scores(scores)
    tie = np.arange(s.size) if rng is None else rng.permutation(s.size)
    return np.lexsort((tie, -s)).astype(np.int64)  # last key is primary


def select(scores, k_new: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ranking over all N samples, kept ids = top ``k_new`` of the ranking, sorted by id).

    Ties as in :func:`rank`: pass a seeded ``rng`` (:func:`tie_break_rng`) for a condensation.
    """
    s = _scores(scores)
    if not 0 <= int(k_new) <= s.size:
        raise ValueError(f"k_new: expected 0..{s.size}, got {k_new!r}")
    ranking = rank(s, rng)
    return ranking, np.sort(ranking[: int(k_new)])


def summary_plan(ranking, k_old: int, k_new: int, lam_min: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tail_ids, lost_ids, weights) of one condensation, exactly as docs/methods/kcd.md §6.

    ``lost`` = ranks ``k_new .. k_old-1``; ``tail`` = the last ``L`` of the kept set (ranks
    ``k_new-L .. k_new-1``), both in rank order; ``weights[j] = lam_min + (1-lam_min)(L-j)/L``,
    so ``weights[0] == 1`` and they fall towards ``lam_min``. The stored image of ``tail[j]``
    becomes ``weights[j] * x[tail[j]] + (1 - weights[j]) * x[lost[j]]``.

    If ``L = k_old - k_new`` exceeds ``k_new`` (a very aggressive step), L is clamped to
    ``k_new``: every kept sample absorbs one dropped sample, the best-ranked ``k_new`` of
    the lost ones, and the rest are dropped without a summary.
    """
    r = np.asarray(ranking, dtype=np.int64).reshape(-1)
    k_old, k_new = int(k_old), int(k_new)
    if not 0 <= k_new <= k_old <= r.size:
        raise ValueError(f"summary_plan: expected 0 <= k_new <= k_old <= {r.size}, got k_new={k_new}, k_old={k_old}")
    if not 0.0 <= lam_min <= 1.0:
        raise ValueError(f"lam_min: expected 0..1, got {lam_min!r}")
    L = min(k_old - k_new, k_new)
    lost = r[k_new : k_new + L].copy()
    tail = r[k_new - L : k_new].copy()
    j = np.arange(L, dtype=np.float64)
    # == lam_min + (1 - lam_min)(L - j)/L, written so that weights[0] is exactly 1.0 (never > 1)
    weights = np.clip(1.0 - (1.0 - lam_min) * j / L, lam_min, 1.0) if L else np.zeros(0)
    return tail, lost, weights.astype(np.float64)


def blend_uint8(tail_img, lost_img, lam) -> np.ndarray:
    """``round(lam * tail + (1 - lam) * lost)`` clipped to 0..255, as uint8.

    ``tail_img`` and ``lost_img`` are uint8 arrays of one shape (one image HWC or a batch
    NHWC); ``lam`` is a scalar or one weight per image of the batch. Computed in float64;
    rounding is numpy's round-half-to-even.
    """
    a, b = np.asarray(tail_img), np.asarray(lost_img)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"blend_uint8: expected uint8 images, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"blend_uint8: image shapes differ: {a.shape} vs {b.shape}")
    w = np.asarray(lam, dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or (w > 1).any():
        raise ValueError("blend_uint8: lam must lie in [0, 1]")
    if w.ndim == 1:
        if a.ndim < 1 or w.shape[0] != a.shape[0]:
            raise ValueError(f"blend_uint8: {w.shape[0]} weights for a batch of shape {a.shape}")
        w = w.reshape((-1,) + (1,) * (a.ndim - 1))
    elif w.ndim > 1:
        raise ValueError(f"blend_uint8: lam must be a scalar or 1-D, got shape {w.shape}")
    out = w * a.astype(np.float64) + (1.0 - w) * b.astype(np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
