"""Ray Data pipelines over a prepared data set: the condensed, augmented train set and eval sets.

Batches, as ``iter_torch_batches`` hands them to Train workers (``augment_on``, config ``data.augment_on``):
``"worker"`` (GPU runs' default): ``{"sample_id": int64[B], "label": int64[B], "image": uint8[B, H, W, C],
"aug": float64[B, k]}`` (each row's augmentation draws; encoded data arrives already cropped, without ``aug``),
finished on the worker's device by ``iter_train_batches(finish=BatchFinisher(...))``
(``kcd_ray.data.device_augment``); ``"split"`` (CPU runs' default): the same with cifar's crop/flip already
applied in the map tasks (no ``aug``), the worker only normalises; ``"pipeline"``: ``"image": float32[B, C, H, W]``
augmented and normalised with meta's mean/std in the map tasks. Extra Parquet columns (``is_duplicate`` ...) are never read.

Train plan (built once, re-executed by Ray Data every epoch), default ``shuffle="full"``, splits up to
``FULL_CACHE_MAX_BYTES`` (2 GiB; at most a quarter of the object store)::

    [built once: the split's Parquet rows read on the driver, one Arrow table per file, ray.put]
    chunk indices 0..ceil(N/B)-1 -> map (one task per chunk of B <= 1024 rows, data_cpus each):
      store state -> permutation of the kept rows -> gather the chunk's rows -> decode/overlay
      -> augment (seed, epoch, id) -> normalise

Each map batch asks the run's MaskStore for its *current* state in ONE actor call
(``mask_store.read_state``: mask version, kept array (cached per version), overlay manifest, epoch),
so a mask published or an epoch set between two executions changes the next epoch for every
worker, shards included (``streaming_split`` runs after the plan). Rows the mask drops are
removed; kept rows with a blend overlay image get it instead of their base image (the base image
is then not even decoded). Publish masks and set epochs between epochs, never during one.

Epoch. The plan does not know which epoch it serves: the trainer creates a MaskStore for every
training run (KCD on or off), passes its name as ``mask_store_name``, and its rank-0 worker calls
``mask_store.set_epoch(store, e)`` (then a barrier) before iterating epoch e. Without a store
(benchmarks, some tests) every execution is epoch 0: the same order and the same augmentation
every time the plan runs.

Shuffling (``shuffle``; ``"auto"`` = ``"full"``).

- ``"full"``: every epoch, the kept rows in a uniformly scrambled order that is a pure function of
  (seed, epoch, kept ids), as ``DataLoader(shuffle=True)`` gives: sorted by the key
  ``transforms.sample_keys(id, (seed, epoch, ORDER))``, a keyed bijection of the id (no ties).
  Two back ends produce exactly that order:

  * cached (splits up to ``FULL_CACHE_MAX_BYTES``): the split's undecoded rows stay in the object
    store for the dataset's lifetime (read once, when the dataset is built, instead of once per
    epoch). Every chunk task computes the epoch's permutation of the kept set (once per worker
    process and epoch: an argsort of N keys), takes its B rows from the cached tables (zero-copy
    reads from shared memory; only the B rows are copied) and decodes/augments them. No barrier:
    the first batch of an epoch waits for one chunk task. Its tasks take ``data_cpus``.
  * sorted (larger splits): per epoch, read_parquet -> a map adding the key (and the epoch, and
    blended rows' overlay pixels) to the undecoded rows -> Ray Data's distributed sort on the key
    (range partitions on fixed equal-width boundaries: the keys are uniform over int64, so no
    sampling stage) -> decode/augment/normalise after the sort (rows move through the sort as
    Parquet bytes: raw uint8 pixels, 4x smaller than float32, or JPEG files). The sort is a barrier
    (an epoch's first batch waits until the whole kept split was read and partitioned) and its
    tasks take one whole CPU each (not configurable in Ray 2.60): with less than one CPU free of
    Train workers and Tune trial drivers, it waits forever. Below ``PULL_SORT_MAX_BYTES`` (4 GiB)
    it uses Ray's pull-based sort: 2.60's default SHUFFLE_V2 sort starts and reaps dedicated worker
    processes, and took 1-8 s per epoch on 2 cores where the pull-based one took 0.1-0.3 s.

  Why the cache by default: measured on 2 cores (4000 rows re-executed per epoch, no Train), an
  epoch took 0.18-0.22 s cached, 0.33-0.35 s sorted; and with 1.5 of 2 CPUs held (two Tune trials)
  the sorted plan hung while the cached one ran.
- ``"block_local"`` (the former default): rows are only permuted inside each map batch (up to 1024
  rows: a minibatch is always drawn from one such block), with file order reshuffled every epoch and
  block order too for splits up to 2 GiB on disk (a barrier that holds the split's bytes). Not a
  uniform permutation of the data set.
- ``"block_local_files"`` (the former ``"files"``): as ``"block_local"`` without the block-order
  randomisation (no barrier at all).

``equal=True`` splits (Ray Train's "train" dataset with >1 workers): the cached ``"full"`` back end pads
each epoch to a multiple of the worker count with the order's first rows (torch's DistributedSampler
does the same), so every kept row is trained on and valued every epoch whatever the worker count (an
elastic run's kept set does not depend on it); the other back ends drop ``kept % num_workers`` rows
of each epoch (< num_workers rows). A consumer-side local
shuffle buffer is still available (``iter_train_batches(shuffle_buffer=...)``, ``data.shuffle_buffer``),
off by default: it cost the training process ~15% throughput on 2 cores.

Worker processes. Map and read tasks take ``data_cpus`` (fractional) CPUs each so Train
workers are never starved, but at most as many run at once as the cluster has CPUs: beyond
that Ray starts extra worker processes (each importing torch) and kills them when idle, which
cost 41 s instead of 1.3 s per 20k-row epoch on 2 cores.

Determinism. With an integer ``seed``, sample i's augmentation in epoch e is a pure function of
(seed, e, i) via ``transforms.sample_uniforms`` (key ``(seed, e)``): independent of the mask
version, block layout, task placement, worker count, shuffle mode and back end, and of how many
times a Ray Data plan ran in this process (a run resumed at epoch k sees the same epoch-k images
as the uninterrupted run). With ``"full"`` the order of the kept rows is a pure function of (seed,
e, kept ids), and its chunks (B rows, a multiple of usual batch sizes) are exact sets whatever the
timing; the plan sets ``preserve_order`` on its own execution options so a single consumer also
sees the chunks in order. Ray Train replaces a dataset's execution options with its
``DataConfig``'s: pass ``DataConfig(execution_options=train_ingest_options())`` to keep the order
exact, and each worker's share of an ``equal=True`` split deterministic, under Train. With
``"block_local*"`` the in-batch permutation is keyed on (seed, e) too, but file and block order come
from Ray's per-execution reseeding (not reproducible across processes).
``seed=None``: the order's key is OS entropy drawn when the dataset is built (a different
permutation every epoch and every build), the augmentation fresh entropy per batch.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from kcd_ray.data import transforms as T

# Our map operators cap concurrency at the cluster's CPU count (see "Worker processes" above); a split of one
# small file gives them a single block, and Ray Data then warns that the cap is higher than the block count.
warnings.filterwarnings("ignore", message=r"The maximum number of concurrent tasks for .* only received",
                        category=UserWarning)
# Ray Data's own ExecutionOptions constructor passes its deprecated exclude_resources (2.60); nothing to change here.
warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources.* is deprecated")

COLUMNS = ["sample_id", "label", "image"]
SHUFFLES = ("auto", "full", "block_local", "block_local_files")
AUGMENT_ON = ("pipeline", "worker", "split")  # resolved values of data.augment_on (augment_stage)
CPU_AUGMENT_ON = "split"  # data.augment_on=auto on CPU workers: see augment_stage
_RENAMED = {"files": "block_local_files", "blocks": "block_local"}
BLOCK_SHUFFLE_MAX_BYTES = 2 * 2**30
READ_BLOCK_BYTES = 16 * 2**20  # smaller read blocks: more map tasks in flight, finer shuffle
FULL_CACHE_MAX_BYTES = 2 * 2**30  # "full": splits up to this (and 1/4 of the object store) are cached; sorted above
SORT_PARTITION_BYTES = 64 * 2**20  # sort partitions of at most ~64 MiB of Parquet bytes ...
MAX_SORT_PARTITIONS = 1024
PULL_SORT_MAX_BYTES = 4 * 2**30  # ... with the pull-based sort up to 4 GiB splits (see "Shuffling")
ORDER = 0x0D5E  # third key word of the row-order hash: the order never reuses the augmentation's key
_EPOCH, _KEY, _OVERLAY = "_epoch", "_order", "_overlay"


def _split_dir(data_dir, split: str) -> Path:
    d = Path(data_dir).expanduser() / split
    if not sorted(d.glob("part-*.parquet")):
        raise FileNotFoundError(f"{d}: no part-*.parquet files; expected a prepared data set with a {split!r} split")
    return d


def _split_bytes(split_dir: Path) -> int:
    return sum(os.path.getsize(f) for f in split_dir.glob("part-*.parquet"))


def _map_batch_rows(meta: dict) -> int:
    """Rows per map task: ~16 MiB of output (float32 rows; uint8 rows for ``augment_on="worker"/"split"``, up to 4096).
    Each task costs ~35 ms of Ray overhead on 2 cores whatever its size (bench/data_ceiling.py: uint8 CIFAR rows
    at 1024/2048/4096 per task: 25k/28k/43k img/s), so fewer, larger tasks where the output stays small."""
    h, w, c = T.image_shape(meta)
    from kcd_ray.data.device_augment import STAGES  # the augment_on values that serve uint8 rows

    if meta.get("_augment_on") in STAGES:
        return int(max(16, min(4096, 2**24 // (h * w * c))))
    return int(max(16, min(1024, 2**24 // (h * w * c * 4))))


def _task_cap() -> Optional[int]:
    """Concurrent tasks per operator: the cluster's CPU count (None before ray.init)."""
    import ray

    if not ray.is_initialized():
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _read(split_dir: Path, data_cpus: float, shuffle_seed=False):
    import ray
    from ray.data import FileShuffleConfig

    from kcd_ray.ray_layer.compat import parquet_reader_v1
    from kcd_ray.storage import parquet_source

    shuffle = None
    if shuffle_seed is not False:
        shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else "files"
    n_files = len(list(split_dir.glob("part-*.parquet")))
    fs, where = parquet_source(split_dir)  # a working copy of a data set in an object store: read from the store
    with parquet_reader_v1(ray.data.DataContext.get_current()):
        ds = ray.data.read_parquet(where, filesystem=fs, columns=COLUMNS, shuffle=shuffle, num_cpus=data_cpus,
                                   concurrency=min(_task_cap() or n_files, n_files))
    ds.context.target_max_block_size = min(ds.context.target_max_block_size or READ_BLOCK_BYTES, READ_BLOCK_BYTES)
    return ds


def _compute(inputs: Optional[int] = None):
    from ray.data import TaskPoolStrategy

    cap = _task_cap()
    return TaskPoolStrategy(size=min(cap, inputs) if cap and inputs else cap)


def _check_cpus(data_cpus: float) -> float:
    if not data_cpus > 0:
        raise ValueError(f"data_cpus: expected > 0 (fractional CPUs per Ray Data task), got {data_cpus!r}")
    return float(data_cpus)


def _lookup(ids: np.ndarray, overlay: Optional[dict]):
    """(hit, overlay images) of a batch's rows, None without an overlay. Looked up once per batch: it serves the
    pixels and the teacher-output cache's ``t_missing``."""
    if not overlay:
        return None
    from kcd_ray.data.blend import overlay_lookup

    return overlay_lookup(overlay, ids)


def _images(ids: np.ndarray, images, meta: dict, overlay: Optional[dict], split: str = "train",
            looked=None) -> np.ndarray:
    """uint8 NHWC of a batch: overlay images where the manifest has one, decoded base images elsewhere.
    ``looked``: the batch's :func:`_lookup`, when the caller has it already."""
    looked = looked if looked is not None else _lookup(ids, overlay)
    if looked is None or not looked[0].any():
        return _decode(images, meta, ids, split)
    hit, over = looked
    rest = np.flatnonzero(~hit)
    return T.with_overlays(hit, over, _decode([images[i] for i in rest], meta, ids[rest]) if rest.size else ())


def _decode(images, meta: dict, ids, split: str = "train"):
    """``decode_full`` (encoded images at their own size, a list) whose errors name the sample id, the split's
    Parquet file and the source image."""
    return T.decode_full(images, meta, sample_ids=ids, split=split, data_dir=meta.get("_data_dir"))


class _NoStore:
    """The state a plan without a MaskStore sees: every row kept, no overlay, epoch 0."""

    version, kept, overlay, epoch, world = 0, None, None, 0, 1


def _state(store: Optional[str]):
    if not store:
        return _NoStore
    from kcd_ray.ray_layer.mask_store import read_state

    return read_state(store)


def _draws(ids: np.ndarray, kind: str, seed: Optional[int], epoch: int, tcache: Optional[dict]) -> np.ndarray:
    """Each row's augmentation draws [B, n_uniforms(kind)]: a pure function of (seed, epoch, id) (views-mode
    teacher cache: of (seed, its view that epoch), one of K); fresh entropy per batch with ``seed=None``."""
    k = T.n_uniforms(kind)
    if seed is None:
        return np.random.default_rng().random((len(ids), k))
    from kcd_ray.cache.store import augment_uniforms

    return augment_uniforms(ids, k, seed, epoch, views=(tcache or {}).get("views", 0))


def _augmented(ids: np.ndarray, x, meta: dict, kind: str, seed: Optional[int], epoch: int,
               tcache: Optional[dict] = None) -> dict:
    """The image columns of a train map. ``augment_on="pipeline"``: augmented, normalised float32 NCHW.
    ``"worker"``/``"split"`` (``meta["_augment_on"]``): uint8 NHWC (encoded data, and cifar with ``split``, already
    cropped) and, where the worker still crops, the draws ``aug``
    the Train worker's :class:`kcd_ray.data.device_augment.BatchFinisher` needs: 4x fewer bytes cross Ray Data."""
    u = _draws(ids, kind, seed, epoch, tcache)
    stage = meta.get("_augment_on", "pipeline")
    if stage == "pipeline":
        return {"image": T.train_transform(x, meta, kind, uniforms=u).numpy()}
    from kcd_ray.data.device_augment import device_kind, host_stage

    out = {"image": host_stage(x, meta, kind, u, stage)}
    if T.n_uniforms(device_kind(meta, kind, stage)):
        out["aug"] = u
    return out


_LOOKUPS: dict = {}  # per process: cache folder -> TeacherLookup (units loaded once)


def _rows(ids: np.ndarray, labels: np.ndarray, x: np.ndarray, meta: dict, kind: str, seed: Optional[int], epoch: int,
          tcache: Optional[dict], blended: Optional[np.ndarray] = None) -> dict:
    """The output rows of a train map: augmented images, and with a teacher-output cache the teacher's cached
    outputs for (epoch, id) joined to them (``t_missing``: KCD blends, which the cache has never seen)."""
    out = {"sample_id": ids.astype(np.int64), "label": labels.astype(np.int64),
           **_augmented(ids, x, meta, kind, seed, epoch, tcache)}
    if tcache is not None:
        from kcd_ray.cache.store import CacheSpec, TeacherLookup

        lookup = _LOOKUPS.get(tcache["dir"])
        if lookup is None:
            lookup = _LOOKUPS[tcache["dir"]] = TeacherLookup(CacheSpec.from_dict(tcache), int(meta["num_classes"]))
        out.update(lookup.columns(ids, epoch, blended))
    return out


def _blended(looked, tcache: Optional[dict]) -> Optional[np.ndarray]:
    """The rows showing an overlay (from the batch's :func:`_lookup`), when a teacher-output cache needs them."""
    return looked[0] if tcache is not None and looked is not None else None


def _order_keys(ids: np.ndarray, order_seed: int, epoch: int) -> np.ndarray:
    return T.sample_keys(ids, (order_seed, epoch, ORDER))


def _arrow_images(ids: np.ndarray, column, meta: dict, overlay: Optional[dict], looked=None) -> np.ndarray:
    """uint8 NHWC of a batch from its Arrow image column: overlay images where the manifest has one."""
    looked = looked if looked is not None else _lookup(ids, overlay)
    if looked is not None:
        hit, over = looked
        if hit.any():
            rest = np.flatnonzero(~hit)
            return T.with_overlays(hit, over, _uint8_images(column.take(rest), meta, ids[rest]) if rest.size else ())
    return _uint8_images(column, meta, ids)


def _uint8_images(column, meta: dict, ids=None) -> np.ndarray:
    """A binary Arrow column of images -> uint8 NHWC (raw pixels without a per-row copy); encoded images: a list
    of each at its own size (``transforms.decode_full``), for ``T.train_transform``/``T.eval_transform``."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    view = _raw_view(arr, meta)
    return view if view is not None else _decode(arr.to_pylist(), meta, ids)


def _raw_view(arr, meta: dict) -> Optional[np.ndarray]:
    """uint8 [n, H, W, C] over a binary Arrow array's data buffer (zero-copy) when it holds raw pixels of the
    data set's shape, one value per row; else None."""
    import pyarrow as pa

    h, w, c = T.image_shape(meta)
    n = len(arr)
    if meta.get("encoding") == "raw" and n and arr.null_count == 0 and arr.type == pa.binary():
        offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1]
        if (np.diff(offsets) == h * w * c).all():
            return np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]: offsets[-1]].reshape(n, h, w, c)
    return None


# --------------------------------------------------------------------------- shuffle="full", cached split


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
        from kcd_ray.ray_layer.mask_store import is_kept

        pos = np.flatnonzero(is_kept(kept, ids))
    keys = _order_keys(ids[pos], order_seed, epoch)
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
        view = _raw_view(ray.get(cache["tables"][b]).column("image").chunk(0), meta)
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

    state = _state(store)
    ids = ray.get(cache["ids"])
    pos = _permutation(cache, ids, state.kept, int(state.epoch), order_seed, int(state.world))
    for c in np.asarray(batch["chunk"], np.int64):
        sel = pos[c * rows:(c + 1) * rows]
        if not len(sel):
            continue  # past the kept set's end (the mask shrank it): no rows
        pixels = _gather_pixels(cache, sel, meta)
        if pixels is not None:  # raw pixels: a numpy gather, overlays written over their rows in place
            cid, labels = ids[sel], ray.get(cache["labels"])[sel]
            looked = _lookup(cid, state.overlay)
            if looked is not None and looked[0].any():
                pixels[looked[0]] = looked[1]
            x = pixels
        else:
            table = _gather(cache, sel)
            cid, labels = table.column("sample_id").to_numpy(), table.column("label").to_numpy()
            looked = _lookup(cid, state.overlay)
            x = _arrow_images(cid, table.column("image"), meta, state.overlay, looked)
        yield _rows(cid, labels, x, meta, kind, seed, int(state.epoch), tcache, _blended(looked, tcache))


def _full_cached(split_dir: Path, meta: dict, kind: str, seed: Optional[int], order_seed: int,
                 store: Optional[str], cpus: float, tcache: Optional[dict] = None, passes=None, workers: int = 1):
    import ray

    cache = _cache_split(split_dir)
    cache["passes"] = None if passes is None else np.asarray(passes, np.int64)
    rows = _map_batch_rows(meta)
    n_chunks = max(1, math.ceil((cache["rows"] + workers - 1) / rows))  # room for the padding to the worker count
    ds = ray.data.from_items([{"chunk": c} for c in range(n_chunks)], override_num_blocks=n_chunks)
    # Exact order for a single consumer (and a deterministic split with Train's train_ingest_options()).
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(_chunk_map, fn_kwargs=dict(cache=cache, rows=rows, meta=meta, kind=kind, seed=seed,
                                                     order_seed=order_seed, store=store, tcache=tcache),
                          batch_size=1, batch_format="numpy", num_cpus=cpus, compute=_compute(n_chunks))


# --------------------------------------------------------------------------- shuffle="full", Ray Data sort


def _select_map(table, order_seed: int, store: Optional[str]):
    """Pre-sort map (pyarrow): mask, overlay pixels of blended rows, epoch and order key. No decoding."""
    import pyarrow as pa

    state = _state(store)
    ids = table.column("sample_id").to_numpy()
    if state.kept is not None:
        from kcd_ray.ray_layer.mask_store import is_kept

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
    yield table.append_column(_KEY, pa.array(_order_keys(ids, order_seed, int(state.epoch))))


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
        x = T.with_overlays(hit, imgs, _uint8_images(table.column("image").take(rest), meta, ids[rest])
                            if rest.size else ())
    else:
        x = _uint8_images(table.column("image"), meta, ids)
    yield _rows(ids, table.column("label").to_numpy(), x, meta, kind, seed, epoch, tcache, hit)


def _sort_boundaries(parts: int) -> list:
    """Equal-width int64 ranges: the order keys are uniform over int64, so each range holds ~1/parts of the rows."""
    step = 2**64 // parts
    return [-2**63 + j * step for j in range(1, parts)]


def _full_sorted(split_dir: Path, meta: dict, kind: str, seed: Optional[int], order_seed: int,
                 store: Optional[str], cpus: float, tcache: Optional[dict] = None):
    from kcd_ray.ray_layer.compat import pull_based_sort

    split_bytes = _split_bytes(split_dir)
    ds = _read(split_dir, cpus)
    if split_bytes <= PULL_SORT_MAX_BYTES:
        pull_based_sort(ds.context)
    ds.context.execution_options.preserve_order = True
    parts = int(min(MAX_SORT_PARTITIONS, max(_task_cap() or 1, math.ceil(split_bytes / SORT_PARTITION_BYTES))))
    ds = ds.map_batches(_select_map, fn_kwargs=dict(order_seed=order_seed, store=store), batch_size=None,
                        batch_format="pyarrow", num_cpus=cpus, compute=_compute())
    ds = ds.sort(_KEY, boundaries=_sort_boundaries(parts)) if parts > 1 else ds.sort(_KEY)
    return ds.map_batches(_sorted_map, fn_kwargs=dict(meta=meta, kind=kind, seed=seed, tcache=tcache),
                          batch_size=_map_batch_rows(meta), batch_format="pyarrow", num_cpus=cpus,
                          compute=_compute())


def _cache_limit() -> int:
    """Largest split (Parquet bytes) the "full" shuffle keeps in the object store: 2 GiB, at most a quarter of it."""
    import ray

    store = ray.cluster_resources().get("object_store_memory") if ray.is_initialized() else None
    return int(min(FULL_CACHE_MAX_BYTES, 0.25 * store)) if store else FULL_CACHE_MAX_BYTES


# --------------------------------------------------------------------------- shuffle="block_local*"


def _train_map(batch: dict, meta: dict, kind: str, seed: Optional[int], order_seed: int, store: Optional[str],
               tcache: Optional[dict] = None):
    """One map batch -> at most one output batch, rows permuted inside it (a generator, so dropped-out batches
    emit nothing)."""
    ids = np.asarray(batch["sample_id"], np.int64)
    labels = np.asarray(batch["label"], np.int64)
    images = batch["image"]
    state = _state(store)
    if state.kept is not None:
        from kcd_ray.ray_layer.mask_store import is_kept

        keep = is_kept(state.kept, ids)
        if not keep.all():
            idx = np.flatnonzero(keep)
            ids, labels, images = ids[idx], labels[idx], [images[i] for i in idx]
    if len(ids) == 0:
        return  # yield nothing: an empty float tensor column would fall back to a pickled column
    looked = _lookup(ids, state.overlay)
    x = _images(ids, images, meta, state.overlay, looked=looked)
    out = _rows(ids, labels, x, meta, kind, seed, int(state.epoch), tcache, _blended(looked, tcache))
    # Row shuffle inside the map task (a Ray Data worker process), not in the trainer: a consumer-side
    # shuffle buffer cost the training process ~15% of its throughput on 2 cores (bench/train_throughput.py).
    perm = np.argsort(_order_keys(ids, order_seed, int(state.epoch)), kind="stable")
    yield {k: v[perm] for k, v in out.items()}


def eval_batch(batch: dict, meta: dict, store: Optional[str] = None, split: str = "train", blended: bool = False) -> dict:
    """Decode (overlay images first, with ``store``) and normalise one raw Parquet batch, no augmentation.
    ``blended``: also a bool column saying which rows show an overlay (teacher-output cache: those miss it)."""
    ids = np.asarray(batch["sample_id"], np.int64)
    overlay = None
    if store:
        from kcd_ray.ray_layer.mask_store import read_mask

        overlay = read_mask(store)[2]
    looked = _lookup(ids, overlay)
    x = _images(ids, batch["image"], meta, overlay, split, looked=looked)
    img = T.eval_transform(x, meta)
    out = {"sample_id": ids, "label": np.asarray(batch["label"], np.int64), "image": img.numpy()}
    if blended:
        out["blended"] = looked[0] if looked is not None else np.zeros(len(ids), bool)
    return out


def _resolve_shuffle(shuffle: str) -> str:
    if shuffle in _RENAMED:
        raise ValueError(f"shuffle: {shuffle!r} was renamed {_RENAMED[shuffle]!r} (rows are only mixed inside "
                         f"1024-row blocks); the default 'auto' = 'full' permutes the whole kept set every epoch")
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle: {shuffle!r} is not one of: {', '.join(SHUFFLES)}")
    return "full" if shuffle == "auto" else shuffle


def train_dataset(data_dir, *, augment: str = "auto", seed: Optional[int] = 0, mask_store_name: Optional[str] = None,
                  data_cpus: float = 0.25, shuffle: str = "auto", teacher_cache: Optional[dict] = None,
                  augment_on: str = "pipeline", passes=None, workers: int = 1):
    """The training set as a Ray Dataset: masked, shuffled, blended, augmented and normalised at execution time.

    ``mask_store_name``: the run's MaskStore (``mask_store.get_mask_store(name, create=True)`` on the driver);
    each execution reads the mask, overlay and epoch (``mask_store.set_epoch``) it holds then. None: every
    row kept, no overlay, epoch 0 in every execution. ``shuffle``: ``"auto"``/``"full"`` (a uniform
    permutation of the kept rows per (seed, epoch)), ``"block_local"``, ``"block_local_files"`` (module
    docstring). ``seed``: int for reproducible order and augmentation, None for OS entropy.
    ``teacher_cache``: a ``CacheSpec.to_dict()``: every row also carries the teacher's cached outputs for its
    (epoch, id) (``t_logits``, ``t_feat``, ``t_missing``), joined in the same map that applies the mask.
    ``augment_on``: ``"pipeline"`` serves normalised float32 NCHW images; ``"worker"`` (``"split"``: the crop/flip
    already applied where pixel-exact) uint8 NHWC images and
    their draws ``aug``, which :func:`iter_train_batches` (``finish=BatchFinisher(...)``) turns into the same
    float images on the worker's device (``kcd_ray.data.device_augment``).
    ``passes``: int[K], the pass (1..G) of each label: every epoch then serves the kept rows of pass 1 in their
    shuffled order, then those of pass 2, ... (ED's sequential passes over D_1..D_g, ``curriculum.mix_groups=
    false``; a single consumer splits the batches at pass boundaries: :func:`split_passes`). Needs the cached
    ``"full"`` back end (splits up to ``FULL_CACHE_MAX_BYTES``).
    ``workers``: the most Train workers that will share an epoch (``scaling.num_workers``). The cached ``"full"``
    back end pads each epoch to a multiple of the current worker count (``mask_store.set_epoch(..., world=)``),
    so no kept row is dropped by Ray Train's equal split; the other back ends drop ``kept % world`` rows.
    """
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"data.augment_on: {augment_on!r} is not one of: {', '.join(AUGMENT_ON)}")
    meta = T.read_meta(data_dir)
    if augment_on != "pipeline":
        meta = {**meta, "_augment_on": augment_on}  # read by _augmented in the map tasks
    if teacher_cache is not None and seed is None:
        raise ValueError("optim.seed: a teacher-output cache needs an integer seed (augmentation must be reproducible)")
    kind = T.resolve_augment(augment, meta)
    cpus = _check_cpus(data_cpus)
    mode = _resolve_shuffle(shuffle)
    split_dir = _split_dir(data_dir, "train")
    if seed is not None:
        seed = int(seed)
    # The row order's key: the seed, or (seed=None) entropy drawn now, the same for every task of the plan.
    order_seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    cached = mode == "full" and _split_bytes(split_dir) <= _cache_limit()
    if passes is not None and not cached:
        raise ValueError(f"curriculum.mix_groups: false (sequential passes over the groups) needs data.shuffle=full "
                         f"on a split of at most {_cache_limit() / 2**30:.2f} GiB; got shuffle {shuffle!r} and "
                         f"{_split_bytes(split_dir) / 2**30:.2f} GiB: set curriculum.mix_groups=true")
    if cached:
        return _full_cached(split_dir, meta, kind, seed, order_seed, mask_store_name, cpus, teacher_cache, passes,
                            workers=max(1, int(workers)))
    if mode == "full":
        return _full_sorted(split_dir, meta, kind, seed, order_seed, mask_store_name, cpus, teacher_cache)
    ds = _read(split_dir, cpus, shuffle_seed=seed)
    if mode == "block_local" and _split_bytes(split_dir) <= BLOCK_SHUFFLE_MAX_BYTES:
        from ray.data import RandomSeedConfig

        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(_train_map, fn_kwargs=dict(meta=meta, kind=kind, seed=seed, order_seed=order_seed,
                                                     store=mask_store_name, tcache=teacher_cache),
                          batch_size=_map_batch_rows(meta), batch_format="numpy", num_cpus=cpus,
                          compute=_compute())


def train_ingest_options():
    """Ray Data execution options for Ray Train's ``DataConfig(execution_options=...)``: Train's defaults
    (:meth:`ray.train.DataConfig.default_ingest_options`) with ``preserve_order=True``, so each worker's
    share of the ``"full"`` permutation, and its order, do not depend on task timing (see "Determinism")."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts


def eval_dataset(data_dir, split: str = "test", data_cpus: float = 0.25, *, mask_store_name: Optional[str] = None,
                 blended: bool = False):
    """A split decoded and normalised, no augmentation, no shuffle (every row once).

    With ``mask_store_name`` (train split only makes sense), rows show their current overlay
    image but nothing is dropped: :func:`scoring_dataset` for the offline E-step.
    """
    meta = T.read_meta(data_dir)
    cpus = _check_cpus(data_cpus)
    ds = _read(_split_dir(data_dir, split), cpus)
    return ds.map_batches(eval_batch, fn_kwargs=dict(meta=meta, store=mask_store_name, split=split, blended=blended),
                          batch_size=_map_batch_rows(meta), batch_format="numpy", num_cpus=cpus,
                          compute=_compute())


def scoring_dataset(data_dir, *, data_cpus: float = 0.25, mask_store_name: Optional[str] = None, decode: bool = True,
                    blended: bool = False):
    """Every training sample once, un-augmented (condensed-away ones included), for the offline E-step.

    Base images by default; with ``mask_store_name`` the current blended images where they exist.
    ``decode=False`` returns the raw Parquet rows: the consumer then calls :func:`eval_batch` itself
    (the CPU scorer does, so decoded float images never cross a process boundary).
    """
    if decode:
        return eval_dataset(data_dir, "train", data_cpus, mask_store_name=mask_store_name, blended=blended)
    return _read(_split_dir(data_dir, "train"), _check_cpus(data_cpus))


def iter_train_batches(shard, batch_size: int, *, epoch: int = 0, seed: Optional[int] = 0,
                       shuffle_buffer: Optional[int] = None, drop_last: bool = False, finish=None, **kwargs):
    """The shard's training batches of ``batch_size`` rows, in the dataset's order, ``finish`` applied to each
    (``BatchFinisher`` for an ``augment_on="worker"`` dataset) after Ray moved it to the worker's device.

    Ray hands over whole blocks (``iter_torch_batches(batch_size=None)``: one chunk of the epoch's order, up to
    4,096 rows), cut here into ``batch_size`` views, with the same rows per batch as Ray's own batching.
    Measured (2 cores, 50k uint8 CIFAR rows, no model, no finishing): Ray's batching at 64 rows delivered
    ~45k img/s, whole blocks cut here ~115k. (Finishing in a background thread, ahead of the consumer, measured
    slower on 2 cores: 38-43k against 42-46k img/s; Ray already fetches blocks in its own thread.)

    ``shuffle_buffer`` (off by default: the dataset is shuffled already; see the module docstring) uses Ray's
    local shuffle buffer and Ray's batching, reseeded per epoch; ``epoch`` seeds only that buffer: the dataset's
    own epoch comes from its MaskStore (``mask_store.set_epoch``). The buffer holds ``shuffle_buffer`` rows per
    worker (256 float CIFAR rows = 3 MiB; 1024 ImageNet rows = 600 MiB; a quarter of that as uint8 rows).
    """
    buf = int(shuffle_buffer or 0)
    if buf:
        local_seed = None if seed is None else (int(seed) * 1_000_003 + int(epoch)) % 2**31
        batches = shard.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, local_shuffle_buffer_size=buf,
                                           local_shuffle_seed=local_seed, **kwargs)
        return batches if finish is None else map(finish, batches)
    blocks = shard.iter_torch_batches(batch_size=None, **kwargs)
    batches = rebatch(blocks, int(batch_size), drop_last)
    return batches if finish is None else map(finish, batches)


def rebatch(blocks, batch_size: int, drop_last: bool = False):
    """Batches of ``batch_size`` rows out of dicts of tensors of any row count (views where a batch lies inside
    one block, a concatenation where it spans two); the last one shorter unless ``drop_last``."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")

    def joined(parts: list) -> dict:
        return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    parts, have = [], 0
    for block in blocks:
        n = len(next(iter(block.values())))
        start = 0
        while start < n:
            take = min(batch_size - have, n - start)
            parts.append({k: v[start:start + take] for k, v in block.items()})
            have, start = have + take, start + take
            if have == batch_size:
                yield joined(parts)
                parts, have = [], 0
    if parts and not drop_last:
        yield joined(parts)


def split_passes(batches, passes):
    """Batches cut where the pass (``passes[label]``) changes, so none straddles two of ED's sequential passes:
    a batch that holds the end of pass g and the start of pass g+1 becomes two."""
    import torch

    table = torch.as_tensor(np.asarray(passes, np.int64))
    for b in batches:
        g = table[b["label"].long().cpu()]
        cuts = (torch.nonzero(g[1:] != g[:-1]).flatten() + 1).tolist()
        if not cuts:
            yield b
            continue
        for lo, hi in zip([0] + cuts, cuts + [len(g)]):
            yield {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == len(g) else v)
                   for k, v in b.items()}


def augment_stage(cfg, gpu: bool) -> str:
    """Where a run's training augmentation runs (``data.augment_on``); ``auto``: ``worker`` on GPU workers,
    ``split`` on CPU workers.

    ``worker``: uint8 rows and their draws cross Ray Data; crop, flip and normalisation run on the worker's
    device (on a GPU, vectorised over the batch after a pinned copy). ``split``: the pixel-exact part (cifar's
    crop/flip on uint8) runs in Ray Data's map tasks, the worker only normalises (random-resized crops stay on
    the worker). ``pipeline``: float rows, everything in Ray Data's tasks.

    Measured on 2 CPU cores, no model (bench/data_ceiling.py, BENCHMARKS.md), 50k CIFAR rows: split 43k, worker
    31k img/s (the in-process DataLoader 77k); float rows (``pipeline``) 14k at 8k rows. On a CPU the consumer is
    the training process itself, so every microsecond of finishing moved to the map tasks is one the step gets
    back; on this machine two processes doing numpy work on the two cores slow each other ~1.7x (memory-bound),
    so the split that leaves the consumer the least work wins."""
    choice = cfg.data.augment_on
    if choice == "auto":
        return "worker" if gpu else CPU_AUGMENT_ON
    return choice
