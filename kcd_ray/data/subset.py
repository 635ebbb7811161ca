"""``data.train_subset``: a class-stratified, seeded subset of the training split, taken at preparation time.

Any source: ``prepare`` lets the source write its full splits, then rewrites ``train/`` with the chosen rows
(:func:`write_train_subset`), in their original order and renumbered 0..n-1; the test split is untouched. The
prepared folder's key carries ``-sub<n>-s<seed>`` (``prepare.prepared_key``), so a different subset is prepared
next to the full set instead of replacing it, and meta.json records it under ``train_subset``. ``mean``/``std``
stay those of the full training split (the same normalisation for every subset of one source).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kcd_ray.config import ConfigError
from kcd_ray.data.parquet_io import SplitWriter, iter_split, split_files

BASE_COLUMNS = ("sample_id", "label", "image")


def stratified_subset(labels, n: int, seed: int) -> np.ndarray:
    """Sorted row indices of a subset of ``n`` rows with each class's share of ``labels``.

    Class c (n_c of the N rows) gets ``n * n_c / N`` rows rounded by largest remainder (ties: the lower class id),
    so the sizes sum to n exactly; its rows are the first ones of a permutation of its members seeded by
    ``(seed, c)``. A pure function of (labels, n, seed); a larger n of the same seed keeps almost every row of a
    smaller one (each class's permutation is the same)."""
    labels = np.asarray(labels, np.int64)
    total = len(labels)
    if not 0 < n < total:
        raise ConfigError(f"data.train_subset: {n} rows of a training split of {total}; expected 1..{total - 1} "
                          "(0 = the whole split)")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n / total)
    take = np.floor(quota).astype(np.int64)
    short = n - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    picked = [np.random.default_rng([int(seed), int(c)]).permutation(np.flatnonzero(labels == c))[:k]
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def write_train_subset(data_dir: Path, n: int, seed: int) -> dict:
    """Replace ``data_dir/train`` by the stratified subset; returns meta's ``splits.train`` and ``train_subset``."""
    data_dir = Path(data_dir)
    labels = np.concatenate([b.column("label").to_numpy() for b in iter_split(data_dir, "train", ["label"])])
    keep = stratified_subset(labels, int(n), int(seed))
    schema = pq.read_schema(split_files(data_dir, "train")[0])
    extra = {f.name: f.type for f in schema if f.name not in BASE_COLUMNS}
    out = data_dir / "train.subset"
    start = 0
    with SplitWriter(out, extra=extra) as w:
        for batch in iter_split(data_dir, "train"):
            rows = keep[(keep >= start) & (keep < start + len(batch))] - start
            start += len(batch)
            if len(rows):
                t = batch.take(pa.array(rows))
                w.add(t.column("label").to_numpy(), t.column("image"),
                      extra={k: t.column(k).to_numpy(zero_copy_only=False) for k in extra})
        info = w.close()
    shutil.rmtree(data_dir / "train")
    os.rename(out, data_dir / "train")
    classes, counts = np.unique(labels[keep], return_counts=True)
    return {"train": info, "train_subset": {"size": int(n), "seed": int(seed), "of": int(len(labels)),
                                            "per_class": {str(c): int(k) for c, k in zip(classes, counts)}}}
