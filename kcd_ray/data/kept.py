"""Membership in a kept mask, by sample id: numpy only (the MaskStore actor imports it; no torch there)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def is_kept(kept: Optional[np.ndarray], sample_ids: np.ndarray) -> np.ndarray:
    """bool[B]: which ids the mask keeps (None = all kept; ids past the end are not kept)."""
    ids = np.asarray(sample_ids, np.int64)
    if kept is None:
        return np.ones(ids.shape, np.bool_)
    inside = (ids >= 0) & (ids < kept.size)
    out = np.zeros(ids.shape, np.bool_)
    out[inside] = kept[ids[inside]]
    return out
