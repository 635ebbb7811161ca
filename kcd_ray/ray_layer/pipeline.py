"""Ray Data pipelines over a prepared data set: the condensed, augmented train set and eval sets.

Batches, as ``iter_torch_batches`` hands them to Train workers (``augment_on``, config ``data.augment_on``):
``"worker"`` (GPU runs' default): ``{"sample_id": int64[B], "label": int64[B], "image": uint8[B, H, W, C],
"aug": float64[B, k]}`` (each row's augmentation draws; encoded data arrives already cropped, without ``aug``),
finished on the worker's device by ``iter_train_batches(finish=BatchFinisher(...))``
(``kcd_ray.data.device_augment``); ``"split"`` (CPU runs' default): the same with cifar's crop/flip already
applied in the map tasks (no ``aug``), the worker only normalises; ``"pipeline"``: ``"image": float32[B, C, H, W]``
augmented and normalised with meta's mean/std in the map tasks. Extra Parquet columns (``is_duplicate`` ...) are
never read.

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

Modules. This one builds the plans and consumes them (:func:`iter_train_batches`); the map tasks' work on a batch
of rows is :mod:`kcd_ray.ray_layer.batch_maps`, the two ``"full"`` back ends :mod:`kcd_ray.ray_layer.full_shuffle`,
reading a split and the task shape (``data_cpus`` per task, at most one task per cluster CPU at once: why)
:mod:`kcd_ray.ray_layer.split_reader`.

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

import os
from typing import Optional

import numpy as np

from kcd_ray.data import transforms as T
from kcd_ray.data.device_augment import AUGMENT_ON
from kcd_ray.ray_layer.batch_maps import block_local_map, eval_batch, map_batch_rows
from kcd_ray.ray_layer.full_shuffle import full_cached, full_sorted
from kcd_ray.ray_layer.split_reader import check_cpus, find_split, parquet_bytes, read_split, task_pool

__all__ = ["train_dataset", "train_ingest_options", "eval_dataset", "scoring_dataset", "eval_batch",
           "iter_train_batches", "rebatch", "split_passes"]

SHUFFLES = ("auto", "full", "block_local", "block_local_files")
_RENAMED = {"files": "block_local_files", "blocks": "block_local"}
BLOCK_SHUFFLE_MAX_BYTES = 2 * 2**30
FULL_CACHE_MAX_BYTES = 2 * 2**30  # "full": splits up to this (and 1/4 of the object store) are cached; sorted above


def _cache_limit() -> int:
    """Largest split (Parquet bytes) the "full" shuffle keeps in the object store: 2 GiB, at most a quarter of it."""
    import ray

    store = ray.cluster_resources().get("object_store_memory") if ray.is_initialized() else None
    return int(min(FULL_CACHE_MAX_BYTES, 0.25 * store)) if store else FULL_CACHE_MAX_BYTES


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
    cpus = check_cpus(data_cpus)
    mode = _resolve_shuffle(shuffle)
    split_dir = find_split(data_dir, "train")
    if seed is not None:
        seed = int(seed)
    # The row order's key: the seed, or (seed=None) entropy drawn now, the same for every task of the plan.
    order_seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    nbytes = parquet_bytes(split_dir)  # one listing of the split's files for every choice below
    cached = mode == "full" and nbytes <= _cache_limit()
    if passes is not None and not cached:
        raise ValueError(f"curriculum.mix_groups: false (sequential passes over the groups) needs data.shuffle=full "
                         f"on a split of at most {_cache_limit() / 2**30:.2f} GiB; got shuffle {shuffle!r} and "
                         f"{nbytes / 2**30:.2f} GiB: set curriculum.mix_groups=true")
    if cached:
        return full_cached(split_dir, meta, kind, seed, order_seed, mask_store_name, cpus, teacher_cache, passes,
                           workers=max(1, int(workers)))
    if mode == "full":
        return full_sorted(split_dir, meta, kind, seed, order_seed, mask_store_name, cpus, teacher_cache)
    ds = read_split(split_dir, cpus, shuffle_seed=seed)
    if mode == "block_local" and nbytes <= BLOCK_SHUFFLE_MAX_BYTES:
        from ray.data import RandomSeedConfig

        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(block_local_map, fn_kwargs=dict(meta=meta, kind=kind, seed=seed, order_seed=order_seed,
                                                          store=mask_store_name, tcache=teacher_cache),
                          batch_size=map_batch_rows(meta), batch_format="numpy", num_cpus=cpus,
                          compute=task_pool())


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
    cpus = check_cpus(data_cpus)
    ds = read_split(find_split(data_dir, split), cpus)
    return ds.map_batches(eval_batch, fn_kwargs=dict(meta=meta, store=mask_store_name, split=split, blended=blended),
                          batch_size=map_batch_rows(meta), batch_format="numpy", num_cpus=cpus,
                          compute=task_pool())


def scoring_dataset(data_dir, *, data_cpus: float = 0.25, mask_store_name: Optional[str] = None, decode: bool = True,
                    blended: bool = False):
    """Every training sample once, un-augmented (condensed-away ones included), for the offline E-step.

    Base images by default; with ``mask_store_name`` the current blended images where they exist.
    ``decode=False`` returns the raw Parquet rows: the consumer then calls :func:`eval_batch` itself
    (the CPU scorer does, so decoded float images never cross a process boundary).
    """
    if decode:
        return eval_dataset(data_dir, "train", data_cpus, mask_store_name=mask_store_name, blended=blended)
    return read_split(find_split(data_dir, "train"), check_cpus(data_cpus))


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
