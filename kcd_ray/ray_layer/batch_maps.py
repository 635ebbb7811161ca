"""The Ray Data map functions of the training and eval plans: read the run's state (mask version, kept ids,
overlay, epoch) from its MaskStore in one call per batch, then build the rows with the pure functions of
:mod:`kcd_ray.data.row_maps`. The plans that run these: :mod:`kcd_ray.ray_layer.pipeline` and
:mod:`kcd_ray.ray_layer.full_shuffle`.
"""

from __future__ import annotations

from typing import Optional

from kcd_ray.data.row_maps import (arrow_images, batch_images, blended_rows, block_local_rows, eval_rows,  # noqa: F401
                                   lookup_overlay, map_batch_rows, order_keys, raw_view, train_rows, uint8_images)
from kcd_ray.ray_layer.mask_store import read_mask, read_state


class _NoStore:
    """The state a plan without a MaskStore sees: every row kept, no overlay, epoch 0."""

    version, kept, overlay, epoch, world = 0, None, None, 0, 1


def store_state(store: Optional[str]):
    """The run's current state (mask version, kept ids, overlay, epoch, world) in one MaskStore call."""
    return read_state(store) if store else _NoStore


def block_local_map(batch: dict, meta: dict, kind: str, seed: Optional[int], order_seed: int,
                    store: Optional[str], tcache: Optional[dict] = None):
    """One map batch -> at most one output batch, rows permuted inside it (a generator, so dropped-out batches
    emit nothing)."""
    out = block_local_rows(batch, meta, kind, seed, order_seed, store_state(store), tcache)
    if out is not None:
        yield out


def eval_batch(batch: dict, meta: dict, store: Optional[str] = None, split: str = "train",
               blended: bool = False) -> dict:
    """Decode (overlay images first, with ``store``) and normalise one raw Parquet batch, no augmentation."""
    return eval_rows(batch, meta, read_mask(store)[2] if store else None, split, blended)
