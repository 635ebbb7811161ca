"""What the data pipeline's map tasks do to a batch of training or eval rows, as pure functions of the rows and
the run's state (kept mask, blend overlay, epoch): mask, overlay, decode, augment (or only the pixel-exact part of
it, per ``augment_on``), join the teacher-output cache's columns, permute rows (``block_local``). No Ray: the
Ray Data plans that call these, with the state read from the run's MaskStore, are
:mod:`kcd_ray.ray_layer.batch_maps`, :mod:`kcd_ray.ray_layer.pipeline` and :mod:`kcd_ray.ray_layer.full_shuffle`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from kcd_ray.data import transforms as T
from kcd_ray.data.kept import is_kept

ORDER = 0x0D5E  # third key word of the row-order hash: the order never reuses the augmentation's key


def map_batch_rows(meta: dict) -> int:
    """Rows per map task: ~16 MiB of output (float32 rows; uint8 rows for ``augment_on="worker"/"split"``, up to 4096).
    Each task costs ~35 ms of Ray overhead on 2 cores whatever its size (bench/data_ceiling.py: uint8 CIFAR rows
    at 1024/2048/4096 per task: 25k/28k/43k img/s), so fewer, larger tasks where the output stays small."""
    h, w, c = T.image_shape(meta)
    from kcd_ray.data.device_augment import STAGES  # the augment_on values that serve uint8 rows

    if meta.get("_augment_on") in STAGES:
        return int(max(16, min(4096, 2**24 // (h * w * c))))
    return int(max(16, min(1024, 2**24 // (h * w * c * 4))))


def lookup_overlay(ids: np.ndarray, overlay: Optional[dict]):
    """(hit, overlay images) of a batch's rows, None without an overlay. Looked up once per batch: it serves the
    pixels and the teacher-output cache's ``t_missing``."""
    if not overlay:
        return None
    from kcd_ray.data.blend import overlay_lookup

    return overlay_lookup(overlay, ids)


def batch_images(ids: np.ndarray, images, meta: dict, overlay: Optional[dict], split: str = "train",
            looked=None) -> np.ndarray:
    """uint8 NHWC of a batch: overlay images where the manifest has one, decoded base images elsewhere.
    ``looked``: the batch's :func:`lookup_overlay`, when the caller has it already."""
    looked = looked if looked is not None else lookup_overlay(ids, overlay)
    if looked is None or not looked[0].any():
        return decode(images, meta, ids, split)
    hit, over = looked
    rest = np.flatnonzero(~hit)
    return T.with_overlays(hit, over, decode([images[i] for i in rest], meta, ids[rest]) if rest.size else ())


def decode(images, meta: dict, ids, split: str = "train"):
    """``decode_full`` (encoded images at their own size, a list) whose errors name the sample id, the split's
    Parquet file and the source image."""
    return T.decode_full(images, meta, sample_ids=ids, split=split, data_dir=meta.get("_data_dir"))


def draws(ids: np.ndarray, kind: str, seed: Optional[int], epoch: int, tcache: Optional[dict]) -> np.ndarray:
    """Each row's augmentation draws [B, n_uniforms(kind)]: a pure function of (seed, epoch, id) (views-mode
    teacher cache: of (seed, its view that epoch), one of K); fresh entropy per batch with ``seed=None``."""
    k = T.n_uniforms(kind)
    if seed is None:
        return np.random.default_rng().random((len(ids), k))
    from kcd_ray.cache.store import augment_uniforms

    return augment_uniforms(ids, k, seed, epoch, views=(tcache or {}).get("views", 0))


def augmented(ids: np.ndarray, x, meta: dict, kind: str, seed: Optional[int], epoch: int,
               tcache: Optional[dict] = None) -> dict:
    """The image columns of a train map. ``augment_on="pipeline"``: augmented, normalised float32 NCHW.
    ``"worker"``/``"split"`` (``meta["_augment_on"]``): uint8 NHWC (encoded data, and cifar with ``split``, already
    cropped) and, where the worker still crops, the draws ``aug``
    the Train worker's :class:`kcd_ray.data.device_augment.BatchFinisher` needs: 4x fewer bytes cross Ray Data."""
    u = draws(ids, kind, seed, epoch, tcache)
    stage = meta.get("_augment_on", "pipeline")
    if stage == "pipeline":
        return {"image": T.train_transform(x, meta, kind, uniforms=u).numpy()}
    from kcd_ray.data.device_augment import device_kind, host_stage

    out = {"image": host_stage(x, meta, kind, u, stage)}
    if T.n_uniforms(device_kind(meta, kind, stage)):
        out["aug"] = u
    return out


_LOOKUPS: dict = {}  # per process: cache folder -> TeacherLookup (units loaded once)


def train_rows(ids: np.ndarray, labels: np.ndarray, x: np.ndarray, meta: dict, kind: str, seed: Optional[int],
               epoch: int, tcache: Optional[dict], blended: Optional[np.ndarray] = None) -> dict:
    """The output rows of a train map: augmented images, and with a teacher-output cache the teacher's cached
    outputs for (epoch, id) joined to them (``t_missing``: KCD blends, which the cache has never seen)."""
    out = {"sample_id": ids.astype(np.int64), "label": labels.astype(np.int64),
           **augmented(ids, x, meta, kind, seed, epoch, tcache)}
    if tcache is not None:
        from kcd_ray.cache.store import CacheSpec, TeacherLookup

        lookup = _LOOKUPS.get(tcache["dir"])
        if lookup is None:
            lookup = _LOOKUPS[tcache["dir"]] = TeacherLookup(CacheSpec.from_dict(tcache), int(meta["num_classes"]))
        out.update(lookup.columns(ids, epoch, blended))
    return out


def blended_rows(looked, tcache: Optional[dict]) -> Optional[np.ndarray]:
    """The rows showing an overlay (from the batch's :func:`lookup_overlay`), when a teacher-output cache needs them."""
    return looked[0] if tcache is not None and looked is not None else None


def order_keys(ids: np.ndarray, order_seed: int, epoch: int) -> np.ndarray:
    """Each row's key in the epoch's order (the order sorts by it): a keyed bijection of the id, no ties."""
    return T.sample_keys(ids, (order_seed, epoch, ORDER))


def arrow_images(ids: np.ndarray, column, meta: dict, overlay: Optional[dict], looked=None) -> np.ndarray:
    """uint8 NHWC of a batch from its Arrow image column: overlay images where the manifest has one."""
    looked = looked if looked is not None else lookup_overlay(ids, overlay)
    if looked is not None:
        hit, over = looked
        if hit.any():
            rest = np.flatnonzero(~hit)
            return T.with_overlays(hit, over, uint8_images(column.take(rest), meta, ids[rest]) if rest.size else ())
    return uint8_images(column, meta, ids)


def uint8_images(column, meta: dict, ids=None) -> np.ndarray:
    """A binary Arrow column of images -> uint8 NHWC (raw pixels without a per-row copy); encoded images: a list
    of each at its own size (``transforms.decode_full``), for ``T.train_transform``/``T.eval_transform``."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    view = raw_view(arr, meta)
    return view if view is not None else decode(arr.to_pylist(), meta, ids)


def raw_view(arr, meta: dict) -> Optional[np.ndarray]:
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




def block_local_rows(batch: dict, meta: dict, kind: str, seed: Optional[int], order_seed: int, state,
                     tcache: Optional[dict] = None) -> Optional[dict]:
    """One map batch of the ``block_local`` shuffles -> its kept rows, built and permuted inside the batch (None
    when none is kept). ``state``: the run's (kept, overlay, epoch)."""
    ids = np.asarray(batch["sample_id"], np.int64)
    labels = np.asarray(batch["label"], np.int64)
    images = batch["image"]
    if state.kept is not None:
        keep = is_kept(state.kept, ids)
        if not keep.all():
            idx = np.flatnonzero(keep)
            ids, labels, images = ids[idx], labels[idx], [images[i] for i in idx]
    if len(ids) == 0:
        return None  # emit nothing: an empty float tensor column would fall back to a pickled column
    looked = lookup_overlay(ids, state.overlay)
    x = batch_images(ids, images, meta, state.overlay, looked=looked)
    out = train_rows(ids, labels, x, meta, kind, seed, int(state.epoch), tcache, blended_rows(looked, tcache))
    # Row shuffle inside the map task (a Ray Data worker process), not in the trainer: a consumer-side
    # shuffle buffer cost the training process ~15% of its throughput on 2 cores (bench/train_throughput.py).
    perm = np.argsort(order_keys(ids, order_seed, int(state.epoch)), kind="stable")
    return {k: v[perm] for k, v in out.items()}


def eval_rows(batch: dict, meta: dict, overlay: Optional[dict] = None, split: str = "train",
              blended: bool = False) -> dict:
    """Decode (overlay images first) and normalise one raw Parquet batch, no augmentation. ``blended``: also a
    bool column saying which rows show an overlay (a teacher-output cache has never seen those)."""
    ids = np.asarray(batch["sample_id"], np.int64)
    looked = lookup_overlay(ids, overlay)
    x = batch_images(ids, batch["image"], meta, overlay, split, looked=looked)
    img = T.eval_transform(x, meta)
    out = {"sample_id": ids, "label": np.asarray(batch["label"], np.int64), "image": img.numpy()}
    if blended:
        out["blended"] = looked[0] if looked is not None else np.zeros(len(ids), bool)
    return out
