"""``shuffle="full"``: every epoch, the kept rows in a uniformly scrambled order that is a pure function of
(seed, epoch, kept ids), as ``DataLoader(shuffle=True)`` gives (see :mod:`kcd_ray.ray_layer.pipeline`, "Shuffling").
Two back ends produce exactly that order: :func:`full_cached` (the split's rows cached in the object store, one
map task per chunk of the epoch's permutation) and :func:`full_sorted` (Ray Data's distributed sort on the order
key, for splits too large to cache).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from kcd_ray.data import transforms as T
from kcd_ray.ray_layer.batch_maps import (arrow_images, blended_rows, lookup_overlay, map_batch_rows, order_keys,
                                          raw_view, store_state, train_rows, uint8_images)
from kcd_ray.ray_layer.split_reader import COLUMNS, parquet_bytes, read_split, task_cap, task_pool

SORT_PARTITION_BYTES = 64 * 2**20  # sort partitions of at most ~64 MiB of Parquet bytes ...
MAX_SORT_PARTITIONS = 1024
PULL_SORT_MAX_BYTES = 4 * 2**30  # ... with the pull-based sort up to 4 GiB splits (see "Shuffling")
_EPOCH, _KEY, _OVERLAY = "_epoch", "_order", "_overlay"


def _cache_split(split_dir: Path) -> dict:
    """The split's (sample_id, label, image) columns in the object store, one Arrow table per file, owned by
    this (the driver's) process: read once here instead of once per epoch."""
    import pyarrow.parquet as pq
    import ray

    refs, ids, labels, starts, n = [], [], [], [], 0
    for f in sorted(split_dir.glob("part-*.parquet")):
        table = pq.read_table(f, columns=COLUMNS).combine_chunks()  # one buffer per column: zero-copy views later
        if not table.num_rows:
            continue
        refs.append(ray.put(table))
        ids.append(table.column("sample_id").to_numpy())
        labels.append(table.column("label").to_numpy())
        starts.append(n)
        n += table.num_rows
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    return {"tables": refs, "starts": np.asarray(starts, np.int64), "ids": ray.put(ids), "rows": n,
            "labels": ray.put(labels), "token": os.urandom(8).hex()}


_ORDERS: dict = {}  # per worker process: cache token -> (kept array, (epoch, order_seed, world), positions in order)


def _permutation(cache: dict, ids: np.ndarray, kept, epoch: int, order_seed: int, world: int = 1) -> np.ndarray:
    """Cache positions of the kept rows, in the epoch's order (computed once per worker process and epoch),
    padded to a multiple of ``world`` with the order's first rows (as torch's DistributedSampler pads): Ray
    Train's equal split then drops nothing, so every kept row is trained on and valued every epoch whatever the
    worker count (an elastic run's E-step and kept set do not depend on how many workers it had)."""
    hit = _ORDERS.get(cache["token"])
    if hit is not None and hit[0] is kept and hit[1] == (epoch, order_seed, world):
        return hit[2]
    if kept is None:
        pos = np.arange(len(ids))
    else:
        from kcd_ray.data.kept import is_kept

        pos = np.flatnonzero(is_kept(kept, ids))
    keys = order_keys(ids[pos], order_seed, epoch)
    if cache.get("passes") is None:
        pos = pos[np.argsort(keys, kind="stable")]
    else:  # sequential passes: group 1's rows in their shuffled order, then group 2's, ... (ED's code)
        import ray

        group = np.asarray(cache["passes"])[ray.get(cache["labels"])[pos]]
        pos = pos[np.lexsort((keys, group))]
    if world > 1 and len(pos) % world:
        pos = np.concatenate([pos, np.resize(pos, (-len(pos)) % world)])
    if len(_ORDERS) >= 8:  # a long-lived worker process that served many datasets (tests)
        _ORDERS.clear()
    _ORDERS[cache["token"]] = (kept, (epoch, order_seed, world), pos)  # holds `kept`: its identity cannot be reused
    return pos


def _gather(cache: dict, pos: np.ndarray):
    """Rows at cache positions ``pos`` (in that order) as one Arrow table; only the rows are copied."""
    import pyarrow as pa
    import ray

    block = np.searchsorted(cache["starts"], pos, side="right") - 1
    order = np.argsort(block, kind="stable")
    parts = []
    for b in np.unique(block):
        sel = order[block[order] == b]
        table = ray.get(cache["tables"][b])
        parts.append(table.take(pa.array(pos[sel] - cache["starts"][b])))
    rows = pa.concat_tables(parts).combine_chunks()
    inverse = np.empty(len(pos), np.int64)
    inverse[order] = np.arange(len(pos))
    return rows.take(pa.array(inverse))


def _gather_pixels(cache: dict, pos: np.ndarray, meta: dict) -> Optional[np.ndarray]:
    """Raw pixels uint8 [B, H, W, C] of the rows at cache positions ``pos``, in that order: one numpy copy of
    the B rows out of zero-copy views of the cached tables (an Arrow ``take`` of the binary column, then a
    reorder, cost 3x as much: 17 ms against ~5 ms per 4,096 CIFAR rows). None unless the split is raw pixels."""
    import ray

    if meta.get("encoding") != "raw":
        return None
    out = np.empty((len(pos),) + tuple(T.image_shape(meta)), np.uint8)
    block = np.searchsorted(cache["starts"], pos, side="right") - 1
    for b in np.unique(block):
        view = raw_view(ray.get(cache["tables"][b]).column("image").chunk(0), meta)
        if view is None:
            return None
        sel = np.flatnonzero(block == b)
        out[sel] = view[pos[sel] - cache["starts"][b]]
    return out


def _chunk_map(batch: dict, cache: dict, rows: int, meta: dict, kind: str, seed: Optional[int], order_seed: int,
               store: Optional[str], tcache: Optional[dict] = None):
    """One chunk of the epoch's permutation: rows [c*rows, (c+1)*rows) of the kept set's order, decoded,
    overlaid, augmented, normalised. One MaskStore call (mask, overlay and epoch) per chunk."""
    import ray

    state = store_state(store)
    ids = ray.get(cache["ids"])
    pos = _permutation(cache, ids, state.kept, int(state.epoch), order_seed, int(state.world))
    for c in np.asarray(batch["chunk"], np.int64):
        sel = pos[c * rows:(c + 1) * rows]
        if not len(sel):
            continue  # past the kept set's end (the mask shrank it): no rows
        pixels = _gather_pixels(cache, sel, meta)
        if pixels is not None:  # raw pixels: a numpy gather, overlays written over their rows in place
            cid, labels = ids[sel], ray.get(cache["labels"])[sel]
            looked = lookup_overlay(cid, state.overlay)
            if looked is not None and looked[0].any():
                pixels[looked[0]] = looked[1]
            x = pixels
        else:
            table = _gather(cache, sel)
            cid, labels = table.column("sample_id").to_numpy(), table.column("label").to_numpy()
            looked = lookup_overlay(cid, state.overlay)
            x = arrow_images(cid, table.column("image"), meta, state.overlay, looked)
        yield train_rows(cid, labels, x, meta, kind, seed, int(state.epoch), tcache, blended_rows(looked, tcache))


def full_cached(split_dir: Path, meta: dict, kind: str, seed: Optional[int], order_seed: int,
                store: Optional[str], cpus: float, tcache: Optional[dict] = None, passes=None, workers: int = 1):
    """The cached back end: one map task per chunk of the epoch's permutation, over the split cached once."""
    import ray

    cache = _cache_split(split_dir)
    cache["passes"] = None if passes is None else np.asarray(passes, np.int64)
    rows = map_batch_rows(meta)
    n_chunks = max(1, math.ceil((cache["rows"] + workers - 1) / rows))  # room for the padding to the worker count
    ds = ray.data.from_items([{"chunk": c} for c in range(n_chunks)], override_num_blocks=n_chunks)
    # Exact order for a single consumer (and a deterministic split with Train's train_ingest_options()).
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(_chunk_map, fn_kwargs=dict(cache=cache, rows=rows, meta=meta, kind=kind, seed=seed,
                                                     order_seed=order_seed, store=store, tcache=tcache),
                          batch_size=1, batch_format="numpy", num_cpus=cpus, compute=task_pool(n_chunks))


# --------------------------------------------------------------------------- shuffle="full", Ray Data sort


def _select_map(table, order_seed: int, store: Optional[str]):
    """Pre-sort map (pyarrow): mask, overlay pixels of blended rows, epoch and order key. No decoding."""
    import pyarrow as pa

    state = store_state(store)
    ids = table.column("sample_id").to_numpy()
    if state.kept is not None:
        from kcd_ray.data.kept import is_kept

        keep = is_kept(state.kept, ids)
        if not keep.all():
            table = table.filter(pa.array(keep))
            ids = ids[keep]
    if len(ids) == 0:
        return  # yield nothing
    table = table.select(COLUMNS)
    if store:  # the column exists in every block of a plan with a store (one schema for the sort)
        over = [None] * len(ids)
        if state.overlay:
            from kcd_ray.data.blend import overlay_lookup

            hit, imgs = overlay_lookup(state.overlay, ids)
            for j, i in enumerate(np.flatnonzero(hit)):
                over[i] = imgs[j].tobytes()
        table = table.append_column(_OVERLAY, pa.array(over, pa.binary()))
    table = table.append_column(_EPOCH, pa.array(np.full(len(ids), int(state.epoch), np.int64)))
    yield table.append_column(_KEY, pa.array(order_keys(ids, order_seed, int(state.epoch))))


def _sorted_map(table, meta: dict, kind: str, seed: Optional[int], tcache: Optional[dict] = None):
    """Post-sort map (rows in permutation order): decode (or overlay) -> augment -> normalise."""
    ids = table.column("sample_id").to_numpy()
    if len(ids) == 0:
        return
    epoch = int(table.column(_EPOCH)[0].as_py())
    hit = None
    if _OVERLAY in table.column_names and table.column(_OVERLAY).null_count < len(ids):
        over = table.column(_OVERLAY).combine_chunks()
        hit = ~np.asarray(over.is_null().to_numpy(zero_copy_only=False), bool)
        h, w, c = T.image_shape(meta)
        imgs = np.frombuffer(b"".join(over.filter(hit).to_pylist()), np.uint8).reshape(-1, h, w, c)
        rest = np.flatnonzero(~hit)
        x = T.with_overlays(hit, imgs, uint8_images(table.column("image").take(rest), meta, ids[rest])
                            if rest.size else ())
    else:
        x = uint8_images(table.column("image"), meta, ids)
    yield train_rows(ids, table.column("label").to_numpy(), x, meta, kind, seed, epoch, tcache, hit)


def sort_boundaries(parts: int) -> list:
    """Equal-width int64 ranges: the order keys are uniform over int64, so each range holds ~1/parts of the rows."""
    step = 2**64 // parts
    return [-2**63 + j * step for j in range(1, parts)]


def full_sorted(split_dir: Path, meta: dict, kind: str, seed: Optional[int], order_seed: int,
                store: Optional[str], cpus: float, tcache: Optional[dict] = None):
    """The sorted back end (splits too large to cache): mask and key before Ray Data's sort, decode after it."""
    from kcd_ray.ray_layer.compat import pull_based_sort

    split_bytes = parquet_bytes(split_dir)
    ds = read_split(split_dir, cpus)
    if split_bytes <= PULL_SORT_MAX_BYTES:
        pull_based_sort(ds.context)
    ds.context.execution_options.preserve_order = True
    parts = int(min(MAX_SORT_PARTITIONS, max(task_cap() or 1, math.ceil(split_bytes / SORT_PARTITION_BYTES))))
    ds = ds.map_batches(_select_map, fn_kwargs=dict(order_seed=order_seed, store=store), batch_size=None,
                        batch_format="pyarrow", num_cpus=cpus, compute=task_pool())
    ds = ds.sort(_KEY, boundaries=sort_boundaries(parts)) if parts > 1 else ds.sort(_KEY)
    return ds.map_batches(_sorted_map, fn_kwargs=dict(meta=meta, kind=kind, seed=seed, tcache=tcache),
                          batch_size=map_batch_rows(meta), batch_format="pyarrow", num_cpus=cpus,
                          compute=task_pool())
