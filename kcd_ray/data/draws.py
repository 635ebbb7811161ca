"""Per-sample random draws that do not depend on batching: a counter-based hash of a key and the sample id
(``sample_keys``, ``sample_uniforms``), so a sample's augmentation is a pure function of (seed, epoch, id) however
Ray cut the data into blocks. Part of :mod:`kcd_ray.data.transforms`, which re-exports it."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

RRC_TRIES = 10
_UNIFORMS = {"cifar": 3, "imagenet": 4 * RRC_TRIES + 1, "none": 0}
AUGMENTS = tuple(_UNIFORMS)


def _check_kind(kind: str) -> None:
    if kind not in AUGMENTS:
        raise ValueError(f"augment: {kind!r} is not one of: {', '.join(AUGMENTS)}")


def n_uniforms(kind: str) -> int:
    """How many uniforms per sample :func:`augment_batch` consumes for ``kind``."""
    _check_kind(kind)
    return _UNIFORMS[kind]


def _mix64(z: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: a bijective avalanche on uint64 (wrap-around arithmetic intended)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key_base(key: Sequence[int]) -> np.ndarray:
    base = np.zeros(1, np.uint64)
    with np.errstate(over="ignore"):
        for k in key:
            base = _mix64(base ^ np.array([int(k) & (2**64 - 1)], np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    return base


def sample_keys(sample_ids, key: Sequence[int]) -> np.ndarray:
    """int64 [B]: a keyed pseudo-random permutation of the 64-bit id space (no shared state).

    A bijection of the id for a fixed ``key`` (odd multiply, xor, and two splitmix64 finalisers, each
    invertible mod 2**64), so distinct ids never tie: sorting rows by this key orders them by a
    uniformly scrambled, exactly reproducible permutation that depends only on (key, ids). Values
    are spread uniformly over the whole int64 range (equal-width ranges hold equal shares of ids).
    """
    base = _key_base(key)
    with np.errstate(over="ignore"):
        ids = np.asarray(sample_ids, np.int64).astype(np.uint64).reshape(-1)
        z = _mix64(_mix64(base ^ (ids * np.uint64(0x9E3779B97F4A7C15))) + np.uint64(0xD1B54A32D192ED03))
    return z.view(np.int64)


def sample_uniforms(sample_ids, n: int, key: Sequence[int]) -> np.ndarray:
    """float64 [B, n] in [0, 1): a pure function of (key, sample id, column); no shared state."""
    base = _key_base(key)
    with np.errstate(over="ignore"):
        ids = np.asarray(sample_ids, np.int64).astype(np.uint64).reshape(-1, 1)
        cols = np.arange(n, dtype=np.uint64).reshape(1, -1)
        z = _mix64(_mix64(base ^ (ids * np.uint64(0x9E3779B97F4A7C15))) + cols)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _uniforms(b: int, kind: str, generator: Optional[torch.Generator], uniforms) -> torch.Tensor:
    k = _UNIFORMS[kind]
    if uniforms is None:
        return torch.rand(b, k, generator=generator, dtype=torch.float64)
    u = torch.as_tensor(np.asarray(uniforms), dtype=torch.float64)
    if u.shape != (b, k):
        raise ValueError(f"uniforms: expected shape ({b}, {k}) for kind {kind!r}, got {tuple(u.shape)}")
    return u
