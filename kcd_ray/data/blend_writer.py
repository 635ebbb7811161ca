"""Writing a condensation version's VAKS summary blends as an overlay on the prepared data set (the format and
the reader: :mod:`kcd_ray.data.blend`): the base set read once, at most ``chunk_size`` pairs' images and one
bucket in memory, each blend the core's round-half-even ``blend_uint8`` of the current images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kcd_ray.condense.vaks import blend_uint8
from kcd_ray.data.blend import (_SCHEMA, OVERLAY_FORMAT, _bucket_path, _ids, _images_table, _read_bucket_file,
                                _write_images, default_bucket_size, overlay_ids)
from kcd_ray.data.transforms import decode_images, image_shape, read_meta


def write_blend_overlay(data_dir, overlay_dir, version: int, tail_ids, lost_ids, weights,
                        prev_overlay: Optional[dict] = None, chunk_size: int = 4096,
                        bucket_size: Optional[int] = None) -> dict:
    """Write version ``version`` of the overlay (see the module docstring); returns its manifest."""
    meta = read_meta(data_dir)
    shape = image_shape(meta)
    tail, lost = _ids("tail_ids", tail_ids), _ids("lost_ids", lost_ids)
    w = np.asarray(weights, np.float64).reshape(-1)
    if not len(tail) == len(lost) == len(w):
        raise ValueError(f"tail_ids, lost_ids, weights: lengths differ ({len(tail)}, {len(lost)}, {len(w)})")
    if len(np.unique(tail)) != len(tail) or len(np.unique(lost)) != len(lost) or np.intersect1d(tail, lost).size:
        raise ValueError("tail_ids/lost_ids: each id may appear once, and no id on both sides")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    prev = prev_overlay or None
    if prev is not None:
        if prev.get("format") != OVERLAY_FORMAT or list(prev.get("image_shape", [])) != list(shape):
            raise ValueError(f"prev_overlay: not an overlay manifest for image_shape {list(shape)}")
        if int(prev["version"]) >= int(version):
            raise ValueError(f"version: {version} must be greater than prev_overlay's {prev['version']}")
        bucket_size = int(prev["bucket_size"])  # a chain keeps one bucketing
    bs = int(bucket_size or default_bucket_size(shape))
    root = Path(overlay_dir).expanduser().resolve()
    vdir_name = f"v{int(version):06d}"
    vdir = root / vdir_name
    if vdir.exists():  # a crashed earlier attempt at this version: its files are unreferenced
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    buckets = {}
    if prev is not None:  # relative entries stay relative when the chain stays in one folder
        proot = Path(prev["root"])
        buckets = {k: (v if proot == root else str(proot / v)) for k, v in prev["buckets"].items()}
    prev_ids = overlay_ids(prev)

    if len(tail):
        groups = _group_pairs(tail, bs, chunk_size)  # pair index lists, whole tail buckets each
        owner = {}
        for g, idx in enumerate(groups):
            owner.update(dict.fromkeys(tail[idx].tolist(), g))
            owner.update(dict.fromkeys(lost[idx].tolist(), g))
        spill = vdir / "_spill"
        spill.mkdir()
        try:
            _gather_current(data_dir, meta, shape, prev, prev_ids, owner, spill)
            for g, idx in enumerate(groups):
                _blend_group(spill / f"group-{g:05d}.parquet", shape, tail[idx], lost[idx], w[idx], prev, bs,
                             vdir, vdir_name, buckets)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
    all_ids = np.union1d(prev_ids, tail).astype(np.int64)
    np.save(vdir / "ids.npy", all_ids)
    manifest = {"format": OVERLAY_FORMAT, "format_version": 1, "version": int(version), "root": str(root),
                "bucket_size": bs, "image_shape": list(shape),
                "buckets": dict(sorted(buckets.items(), key=lambda kv: int(kv[0]))),
                "ids_file": f"{vdir_name}/ids.npy", "num_ids": int(all_ids.size)}
    tmp = vdir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, vdir / "manifest.json")  # last: a version without a manifest never happened
    return manifest


def _group_pairs(tail: np.ndarray, bs: int, chunk_size: int) -> list[np.ndarray]:
    """Pair indices sorted by tail id, cut into groups of whole tail buckets, ~chunk_size pairs each."""
    order = np.argsort(tail, kind="stable")
    b = tail[order] // bs
    cuts = np.flatnonzero(np.diff(b)) + 1  # bucket boundaries
    starts = np.concatenate([[0], cuts])
    groups, cur = [], []
    n_cur = 0
    for s, e in zip(starts, np.concatenate([cuts, [len(order)]])):
        if cur and n_cur + (e - s) > chunk_size:
            groups.append(np.concatenate(cur))
            cur, n_cur = [], 0
        cur.append(order[s:e])
        n_cur += e - s
    if cur:
        groups.append(np.concatenate(cur))
    return groups


class _Spill:
    """Routes (id, image) rows to per-group Parquet files, buffering up to 64 MiB in all."""

    def __init__(self, folder: Path, owner: dict):
        self.folder, self.owner = folder, owner
        self.buf: dict[int, list] = {}
        self.bytes = 0
        self.writers: dict[int, pq.ParquetWriter] = {}

    def add(self, ids: np.ndarray, imgs: np.ndarray) -> None:
        for i, img in zip(ids.tolist(), imgs):
            self.buf.setdefault(self.owner[i], []).append((i, img))
            self.bytes += img.nbytes
        if self.bytes >= 64 * 2**20:
            self.flush()

    def flush(self) -> None:
        for g, rows in self.buf.items():
            ids = np.array([r[0] for r in rows], np.int64)
            imgs = np.stack([r[1] for r in rows])
            if g not in self.writers:
                self.writers[g] = pq.ParquetWriter(self.folder / f"group-{g:05d}.parquet", _SCHEMA)
            self.writers[g].write_table(_images_table(ids, imgs))
        self.buf, self.bytes = {}, 0

    def close(self) -> None:
        self.flush()
        for wr in self.writers.values():
            wr.close()


def _gather_current(data_dir, meta, shape, prev, prev_ids, owner: dict, spill_dir: Path) -> None:
    """One pass: every needed id's current image (previous overlay, else decoded base) -> its group's spill."""
    needed = np.fromiter(owner.keys(), np.int64, len(owner))
    from_prev = np.intersect1d(needed, prev_ids)
    from_base = np.setdiff1d(needed, from_prev)
    spill = _Spill(spill_dir, owner)
    if from_prev.size:
        for b in np.unique(from_prev // int(prev["bucket_size"])).tolist():
            ids, imgs = _read_bucket_file(_bucket_path(prev, b), shape)
            sel = np.isin(ids, from_prev)
            spill.add(ids[sel], imgs[sel])
    found = 0
    files = sorted((Path(data_dir) / "train").glob("part-*.parquet"))
    for f in files:
        if found == from_base.size:
            break
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            ids = pf.read_row_group(rg, columns=["sample_id"]).column(0).to_numpy()
            sel = np.isin(ids, from_base)
            if not sel.any():
                continue
            rows = np.flatnonzero(sel)
            col = pf.read_row_group(rg, columns=["image"]).column(0).take(pa.array(rows))
            spill.add(ids[rows], decode_images(col.to_pylist(), meta))
            found += rows.size
    spill.close()
    if found != from_base.size:
        raise ValueError(f"{Path(data_dir) / 'train'}: {from_base.size - found} of the tail/lost ids are not in "
                         f"the training split (ids must be sample ids of the prepared train split)")


def _blend_group(spill_file: Path, shape, tail, lost, w, prev, bs: int, vdir: Path, vdir_name: str,
                 buckets: dict) -> None:
    ids, imgs = _read_bucket_file(spill_file, shape)
    order = np.argsort(ids)
    ids, imgs = ids[order], imgs[order]
    blended = blend_uint8(imgs[np.searchsorted(ids, tail)], imgs[np.searchsorted(ids, lost)], w)
    tb = tail // bs
    for b in np.unique(tb).tolist():
        sel = tb == b
        new_ids, new_imgs = tail[sel], blended[sel]
        old = _bucket_path(prev, b) if prev is not None else None
        if old is not None:  # carry over the bucket's earlier blends that this version leaves alone
            o_ids, o_imgs = _read_bucket_file(old, shape)
            keep = ~np.isin(o_ids, new_ids)
            new_ids = np.concatenate([o_ids[keep], new_ids])
            new_imgs = np.concatenate([o_imgs[keep], new_imgs])
        o = np.argsort(new_ids)
        rel = f"{vdir_name}/bucket-{b:06d}.parquet"
        _write_images(vdir.parent / rel, new_ids[o], new_imgs[o])
        buckets[str(b)] = rel
