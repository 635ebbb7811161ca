"""Ray Data pipelines over a prepared data set: the condensed, augmented train set and eval sets.

Batches, as ``iter_torch_batches`` hands them to Train workers:
``{"sample_id": int64[B], "label": int64[B], "image": float32[B, C, H, W]}`` (normalised with
meta's mean/std). Extra Parquet columns (``is_duplicate`` ...) are never read.

Train plan (re-executed by Ray Data every epoch)::

    read_parquet(file order shuffled per epoch) -> [randomize_block_order]
      -> map_batches: mask -> overlay -> decode -> augment -> normalise

The map asks the MaskStore for the *current* version each time it runs (``mask.read_mask``,
cached per version), so a mask published between two epochs changes the rows of the next
epoch for every worker, shards included (``streaming_split`` runs after the map). Rows the
mask drops are removed; kept rows with a blend overlay image get it instead of their base
image (the base image is then not even decoded).

Worker processes. Map and read tasks take ``data_cpus`` (fractional) CPUs each so Train
workers are never starved, but at most as many run at once as the cluster has CPUs: beyond
that Ray starts extra worker processes (each importing torch) and kills them when idle, which
cost 41 s instead of 1.3 s per 20k-row epoch on 2 cores.

Shuffling. Files are read in a new random order each epoch; ``shuffle="blocks"`` also
randomises block order (a barrier that holds the whole split's Parquet bytes in the object
store; ``"auto"`` does it for splits up to 2 GiB on disk). Rows are mixed further inside each map
batch (up to 1024 rows, permuted in the map task, off the trainer's cores); a consumer-side local
shuffle buffer is available (``iter_train_batches(shuffle_buffer=...)``, ``data.shuffle_buffer``) but
off by default: it cost the training process ~15% throughput on 2 cores. No full ``random_shuffle``:
at ImageNet size it moves the whole data set every epoch.

Determinism. With an integer ``seed``, sample i's augmentation in an epoch is a pure function
of (seed, Ray's execution index of the dataset = epochs started since the trainer began,
mask version, i) via ``transforms.sample_uniforms``: independent of block layout, task
placement and worker count. An epoch abandoned midway does not advance the execution index,
and a restarted worker group starts again at 0. ``seed=None``: fresh OS entropy per batch.
Row order is not deterministic (parallel tasks finish in any order).
"""

from __future__ import annotations

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

COLUMNS = ["sample_id", "label", "image"]
SHUFFLES = ("auto", "files", "blocks")
BLOCK_SHUFFLE_MAX_BYTES = 2 * 2**30
READ_BLOCK_BYTES = 16 * 2**20  # smaller read blocks: more map tasks in flight, finer shuffle


def _split_dir(data_dir, split: str) -> Path:
    d = Path(data_dir).expanduser() / split
    if not sorted(d.glob("part-*.parquet")):
        raise FileNotFoundError(f"{d}: no part-*.parquet files; expected a prepared data set with a {split!r} split")
    return d


def _map_batch_rows(meta: dict) -> int:
    h, w, c = T.image_shape(meta)
    return int(max(16, min(1024, 2**24 // (h * w * c * 4))))  # ~16 MiB of float32 output


def _task_cap() -> Optional[int]:
    """Concurrent tasks per operator: the cluster's CPU count (None before ray.init)."""
    import ray

    if not ray.is_initialized():
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _read(split_dir: Path, data_cpus: float, shuffle_seed=False):
    import ray
    from ray.data import FileShuffleConfig

    shuffle = None
    if shuffle_seed is not False:
        shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else "files"
    n_files = len(list(split_dir.glob("part-*.parquet")))
    ctx = ray.data.DataContext.get_current()
    v2 = getattr(ctx, "use_datasource_v2", False)
    # Ray 2.60's DataSourceV2 Parquet path (ListFiles -> ReadFiles) costs seconds per execution,
    # i.e. per epoch, on small machines; the V1 reader takes ~0.2 s for the same files.
    ctx.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(str(split_dir), columns=COLUMNS, shuffle=shuffle, num_cpus=data_cpus,
                                   concurrency=min(_task_cap() or n_files, n_files))
    finally:
        ctx.use_datasource_v2 = v2
    ds.context.target_max_block_size = min(ds.context.target_max_block_size or READ_BLOCK_BYTES, READ_BLOCK_BYTES)
    return ds


def _compute():
    from ray.data import TaskPoolStrategy

    return TaskPoolStrategy(size=_task_cap())


def _check_cpus(data_cpus: float) -> float:
    if not data_cpus > 0:
        raise ValueError(f"data_cpus: expected > 0 (fractional CPUs per Ray Data task), got {data_cpus!r}")
    return float(data_cpus)


def _images(ids: np.ndarray, images, meta: dict, overlay: Optional[dict]) -> np.ndarray:
    """uint8 NHWC of a batch: overlay images where the manifest has one, decoded base images elsewhere."""
    if not overlay:
        return T.decode_images(images, meta)
    from kcd_ray.data.blend import overlay_lookup

    hit, over = overlay_lookup(overlay, ids)
    if not hit.any():
        return T.decode_images(images, meta)
    h, w, c = T.image_shape(meta)
    out = np.empty((len(ids), h, w, c), np.uint8)
    out[hit] = over
    rest = np.flatnonzero(~hit)
    if rest.size:
        out[rest] = T.decode_images([images[i] for i in rest], meta)
    return out


def _execution_index() -> int:
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))  # private, Ray 2.60


def _train_map(batch: dict, meta: dict, kind: str, seed: Optional[int], store: Optional[str]):
    """One map batch -> at most one output batch (a generator, so dropped-out batches emit nothing)."""
    ids = np.asarray(batch["sample_id"], np.int64)
    labels = np.asarray(batch["label"], np.int64)
    images = batch["image"]
    version, overlay = 0, None
    if store:
        from kcd_ray.data.mask import is_kept, read_mask

        version, kept, overlay = read_mask(store)
        keep = is_kept(kept, ids)
        if not keep.all():
            idx = np.flatnonzero(keep)
            ids, labels, images = ids[idx], labels[idx], [images[i] for i in idx]
    if len(ids) == 0:
        return  # yield nothing: an empty float tensor column would fall back to a pickled column
    x = _images(ids, images, meta, overlay)
    k = T.n_uniforms(kind)
    if seed is None:
        u = np.random.default_rng().random((len(ids), k + 1))
    else:
        u = T.sample_uniforms(ids, k + 1, (seed, _execution_index(), version))
    img = T.train_transform(x, meta, kind, uniforms=u[:, :k])
    # Row shuffle inside the map task (a Ray Data worker process), not in the trainer: a consumer-side
    # shuffle buffer cost the training process ~15% of its throughput on 2 cores (bench/train_throughput.py).
    perm = np.argsort(u[:, k], kind="stable")
    yield {"sample_id": ids[perm], "label": labels[perm], "image": img.numpy()[perm]}


def eval_batch(batch: dict, meta: dict, store: Optional[str] = None) -> dict:
    """Decode (overlay images first, with ``store``) and normalise one raw Parquet batch, no augmentation."""
    ids = np.asarray(batch["sample_id"], np.int64)
    overlay = None
    if store:
        from kcd_ray.data.mask import read_mask

        overlay = read_mask(store)[2]
    x = _images(ids, batch["image"], meta, overlay)
    img = T.eval_transform(x, meta)
    return {"sample_id": ids, "label": np.asarray(batch["label"], np.int64), "image": img.numpy()}


def _resolve_shuffle(shuffle: str, split_dir: Path) -> str:
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle: {shuffle!r} is not one of: {', '.join(SHUFFLES)}")
    if shuffle == "auto":
        size = sum(os.path.getsize(f) for f in split_dir.glob("part-*.parquet"))
        return "blocks" if size <= BLOCK_SHUFFLE_MAX_BYTES else "files"
    return shuffle


def train_dataset(data_dir, *, augment: str = "auto", seed: Optional[int] = 0, mask_store_name: Optional[str] = None,
                  data_cpus: float = 0.25, shuffle: str = "auto"):
    """The training set as a Ray Dataset: masked, blended, augmented and normalised at execution time."""
    meta = T.read_meta(data_dir)
    kind = T.resolve_augment(augment, meta)
    cpus = _check_cpus(data_cpus)
    split_dir = _split_dir(data_dir, "train")
    if seed is not None:
        seed = int(seed)
    ds = _read(split_dir, cpus, shuffle_seed=seed)
    if _resolve_shuffle(shuffle, split_dir) == "blocks":
        from ray.data import RandomSeedConfig

        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(_train_map, fn_kwargs=dict(meta=meta, kind=kind, seed=seed, store=mask_store_name),
                          batch_size=_map_batch_rows(meta), batch_format="numpy", num_cpus=cpus,
                          compute=_compute())


def eval_dataset(data_dir, split: str = "test", data_cpus: float = 0.25, *, mask_store_name: Optional[str] = None):
    """A split decoded and normalised, no augmentation, no shuffle (every row once).

    With ``mask_store_name`` (train split only makes sense), rows show their current overlay
    image but nothing is dropped: :func:`scoring_dataset` for the offline E-step.
    """
    meta = T.read_meta(data_dir)
    cpus = _check_cpus(data_cpus)
    ds = _read(_split_dir(data_dir, split), cpus)
    return ds.map_batches(eval_batch, fn_kwargs=dict(meta=meta, store=mask_store_name),
                          batch_size=_map_batch_rows(meta), batch_format="numpy", num_cpus=cpus,
                          compute=_compute())


def scoring_dataset(data_dir, *, data_cpus: float = 0.25, mask_store_name: Optional[str] = None, decode: bool = True):
    """Every training sample once, un-augmented (condensed-away ones included), for the offline E-step.

    Base images by default; with ``mask_store_name`` the current blended images where they exist.
    ``decode=False`` returns the raw Parquet rows: the consumer then calls :func:`eval_batch` itself
    (the CPU scorer does, so decoded float images never cross a process boundary).
    """
    if decode:
        return eval_dataset(data_dir, "train", data_cpus, mask_store_name=mask_store_name)
    return _read(_split_dir(data_dir, "train"), _check_cpus(data_cpus))


def iter_train_batches(shard, batch_size: int, *, epoch: int = 0, seed: Optional[int] = 0,
                       shuffle_buffer: Optional[int] = None, drop_last: bool = False, **kwargs):
    """``shard.iter_torch_batches`` with an optional local shuffle buffer reseeded per epoch (off by default:
    rows are already permuted in the map tasks; see the module docstring).

    The buffer holds ``shuffle_buffer`` decoded float rows per worker (256 CIFAR rows = 3 MiB;
    1024 ImageNet rows = 600 MiB).
    """
    buf = int(shuffle_buffer or 0)
    local_seed = None if seed is None else (int(seed) * 1_000_003 + int(epoch)) % 2**31
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=drop_last,
                                    local_shuffle_buffer_size=buf or None,
                                    local_shuffle_seed=local_seed if buf else None, **kwargs)
