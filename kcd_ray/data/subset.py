"""Class-stratified, seeded parts of the training split, taken at preparation time, for any source.

- ``data.train_subset``: ``prepare`` lets the source write its full splits, then rewrites ``train/`` with the
  chosen rows (:func:`write_train_subset`), in their original order and renumbered 0..n-1; the test split is
  untouched. The prepared folder's key carries ``-sub<n>-s<seed>``, and meta.json records it under
  ``train_subset``.
- ``data.val_fraction``: a validation split carved out of the (subset) training split (:func:`write_val_split`):
  ``train/`` keeps the other rows (ids 0..n_train-1), ``val/`` holds the carved ones (ids n_train..n-1) and
  ``test/`` is renumbered after both (n..n+m-1), so no sample id is shared between the three splits. The key
  carries ``-val<fraction>-s<seed>``; meta.json records it under ``val_split``.

A different subset or fraction is prepared next to the others instead of replacing them (``prepare.prepared_key``).
``mean``/``std`` stay those of the source's full training split (the same normalisation for every part).
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


def stratified_subset(labels, n: int, seed: int, key: str = "data.train_subset") -> np.ndarray:
    """Sorted row indices of a subset of ``n`` rows with each class's share of ``labels``.

    Class c (n_c of the N rows) gets ``n * n_c / N`` rows rounded by largest remainder (ties: the lower class id),
    so the sizes sum to n exactly; its rows are the first ones of a permutation of its members seeded by
    ``(seed, c)``. A pure function of (labels, n, seed); a larger n of the same seed keeps almost every row of a
    smaller one (each class's permutation is the same)."""
    labels = np.asarray(labels, np.int64)
    total = len(labels)
    if not 0 < n < total:
        raise ConfigError(f"{key}: {n} rows of a training split of {total}; expected 1..{total - 1} "
                          "(0 = the whole split)")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n / total)
    take = np.floor(quota).astype(np.int64)
    short = n - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    picked = [np.random.default_rng([int(seed), int(c)]).permutation(np.flatnonzero(labels == c))[:k]
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _labels(data_dir: Path, split: str = "train") -> np.ndarray:
    return np.concatenate([b.column("label").to_numpy() for b in iter_split(data_dir, split, ["label"])])


def _rewrite(data_dir: Path, split: str, rows: np.ndarray, out_name: str, first_id: int) -> dict:
    """Write the rows ``rows`` (sorted positions) of ``split`` into ``<data_dir>/<out_name>`` with sample ids from
    ``first_id``; returns the new split's meta info."""
    schema = pq.read_schema(split_files(data_dir, split)[0])
    extra = {f.name: f.type for f in schema if f.name not in BASE_COLUMNS}
    start = 0
    with SplitWriter(data_dir / out_name, extra=extra, first_id=first_id) as w:
        for batch in iter_split(data_dir, split):
            sel = rows[(rows >= start) & (rows < start + len(batch))] - start
            start += len(batch)
            if len(sel):
                t = batch.take(pa.array(sel))
                w.add(t.column("label").to_numpy(), t.column("image"),
                      extra={k: t.column(k).to_numpy(zero_copy_only=False) for k in extra})
        return w.close()


def _replace(data_dir: Path, split: str, new: str) -> None:
    shutil.rmtree(data_dir / split)
    os.rename(data_dir / new, data_dir / split)


def _per_class(labels: np.ndarray) -> dict:
    classes, counts = np.unique(labels, return_counts=True)
    return {str(c): int(k) for c, k in zip(classes, counts)}


def write_train_subset(data_dir: Path, n: int, seed: int) -> dict:
    """Replace ``data_dir/train`` by the stratified subset; returns meta's ``splits.train`` and ``train_subset``."""
    data_dir = Path(data_dir)
    labels = _labels(data_dir)
    keep = stratified_subset(labels, int(n), int(seed))
    info = _rewrite(data_dir, "train", keep, "train.subset", first_id=0)
    _replace(data_dir, "train", "train.subset")
    return {"train": info, "train_subset": {"size": int(n), "seed": int(seed), "of": int(len(labels)),
                                            "per_class": _per_class(labels[keep])}}


def val_size(fraction: float, total: int) -> int:
    return int(round(float(fraction) * int(total)))


def write_val_split(data_dir: Path, fraction: float, seed: int) -> dict:
    """Carve the validation split out of ``data_dir/train`` (module docstring); returns meta's ``splits`` entries
    for train, val and test, and ``val_split`` (fraction, seed, size, of, per class)."""
    data_dir = Path(data_dir)
    labels = _labels(data_dir)
    val = stratified_subset(labels, val_size(fraction, len(labels)), int(seed), key="data.val_fraction")
    train = np.setdiff1d(np.arange(len(labels)), val)
    info = {"val": _rewrite(data_dir, "train", val, "val", first_id=len(train)),
            "train": _rewrite(data_dir, "train", train, "train.rest", first_id=0)}
    _replace(data_dir, "train", "train.rest")
    num_test = sum(pq.read_metadata(f).num_rows for f in split_files(data_dir, "test"))
    info["test"] = _rewrite(data_dir, "test", np.arange(num_test), "test.renumbered", first_id=len(labels))
    _replace(data_dir, "test", "test.renumbered")
    return {"splits": info, "val_split": {"fraction": float(fraction), "seed": int(seed), "size": int(len(val)),
                                          "of": int(len(labels)), "per_class": _per_class(labels[val])}}
