"""VAKS summary blends stored as an overlay on the prepared data set, never all in memory.

Storage. A condensation version ``v`` replaces the stored image of each ``tail[j]`` by
``blend_uint8(x[tail[j]], x[lost[j]], weights[j])`` (``kcd_ray.condense.vaks``: round-half-even
of ``w*tail + (1-w)*lost`` on raw uint8). ``x`` is a sample's *current* image: its newest
overlay image if it has one, else its base image (decoded and brought to ``meta.image_shape``
for encoded sets), so blends are cumulative. Overlay images are raw uint8 HWC bytes at
``meta.image_shape`` whatever the base encoding, in Parquet files (``sample_id``, ``image``)
bucketed by ``sample_id // bucket_size``::

    <overlay_dir>/v000003/bucket-000012.parquet   every overridden id of bucket 12 as of v3
    <overlay_dir>/v000003/ids.npy                 all overridden ids as of v3 (sorted int64)
    <overlay_dir>/v000003/manifest.json           the manifest returned by write_blend_overlay

The manifest (a JSON-able dict, published through the MaskStore) maps bucket -> file, relative
to its ``root``. A version rewrites only the buckets holding one of its tail ids; the others
keep pointing at the files of earlier versions. A run in an object store adds ``remote_root`` (the
URI of the uploaded overlay folder): readers on any node then read the files from there.

Cost. The overridden ids are the union of all tails, at most K_0 - K_final = (1 - rho) N, so
the files one manifest references hold at most (1-rho)N images (CIFAR-100 at rho=0.7: 15k x
3 KiB = 45 MiB); every version adds at most that much again on disk until ``BlendOverlays.prune``
removes the files no kept version references. The writer reads the base set once (only the
``sample_id`` column of row groups without a needed id) and holds at most ``chunk_size``
pairs' images plus one bucket; a reader (the train map) holds at most two buckets (LRU),
each about 32 MiB at the default bucket size.

This module holds the format, the manifests and the reader; the writer is :mod:`kcd_ray.data.blend_writer`.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kcd_ray import storage
from kcd_ray.data.decode import decode_images

OVERLAY_FORMAT = "kcd_overlay"
BUCKET_BYTES = 32 * 2**20
_SCHEMA = pa.schema([("sample_id", pa.int64()), ("image", pa.binary())])


def default_bucket_size(shape) -> int:
    """Ids per bucket so that a full bucket holds about 32 MiB of raw images (64..8192)."""
    h, w, c = shape
    return int(max(64, min(8192, BUCKET_BYTES // (h * w * c))))


def _ids(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected integer sample ids, got dtype {a.dtype}")
    return a.astype(np.int64).reshape(-1)


def _file(manifest: dict, rel: str):
    """A manifest's file: a local path, or its URI when the overlay lives in an object store."""
    if manifest.get("remote_root"):
        return storage.join(manifest["remote_root"], rel)
    return Path(manifest["root"]) / rel


def _readable(f):
    """What pyarrow.parquet / numpy read: the path itself, or a seekable file opened in the store."""
    return storage.open_input(f) if isinstance(f, str) else f


def _bucket_path(manifest: dict, bucket: int):
    rel = manifest["buckets"].get(str(bucket))
    return None if rel is None else _file(manifest, rel)


def overlay_ids(manifest: Optional[dict]) -> np.ndarray:
    """All overridden sample ids of a manifest (sorted)."""
    if not manifest or not manifest.get("ids_file"):
        return np.zeros(0, np.int64)
    f = _file(manifest, manifest["ids_file"])
    return np.load(io.BytesIO(storage.read_bytes(f)) if isinstance(f, str) else f)


def check_overlay(manifest: Optional[dict]) -> None:
    """Fail now, naming the file, if an overlay's files are missing or unreadable (used on resume, so a damaged
    run folder is reported before training restarts rather than from inside a Ray Data task)."""
    if not manifest:
        return
    for b in manifest["buckets"]:
        f = _bucket_path(manifest, b)
        try:
            md = pq.read_metadata(_readable(f))
        except Exception as e:  # noqa: BLE001 - missing, truncated or not Parquet
            raise ValueError(f"{f}: unreadable blend overlay file of version {manifest.get('version')} "
                             f"({type(e).__name__}: {e}); start a new run.name or restore the run folder") from None
        if not {"sample_id", "image"} <= set(md.schema.names):
            raise ValueError(f"{f}: blend overlay file lacks sample_id/image columns (has {md.schema.names})")
    try:
        overlay_ids(manifest)
    except Exception as e:  # noqa: BLE001
        f = _file(manifest, manifest["ids_file"])
        raise ValueError(f"{f}: unreadable blend overlay id list ({type(e).__name__}: {e})") from None


def _read_bucket_file(path, shape) -> tuple[np.ndarray, np.ndarray]:
    try:
        t = pq.read_table(_readable(path), columns=["sample_id", "image"])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: unreadable blend overlay file ({type(e).__name__}: {e})") from None
    ids = t.column("sample_id").to_numpy()
    imgs = decode_images(t.column("image").to_pylist(), {"image_shape": list(shape), "encoding": "raw"})
    return ids, imgs


def _images_table(ids: np.ndarray, imgs: np.ndarray) -> pa.Table:
    n = len(ids)
    flat = np.ascontiguousarray(imgs).reshape(n, -1)
    offsets = (np.arange(n + 1, dtype=np.int64) * flat.shape[1]).astype(np.int32)
    col = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), col], schema=_SCHEMA)


def _write_images(path: Path, ids: np.ndarray, imgs: np.ndarray) -> None:
    pq.write_table(_images_table(ids, imgs), path, use_dictionary=["sample_id"], write_statistics=["sample_id"])


def load_overlay(overlay_dir, version: int) -> dict:
    """The manifest of ``version`` from disk, re-rooted at ``overlay_dir`` (the folder may have moved)."""
    root = Path(overlay_dir).expanduser().resolve()
    p = root / f"v{int(version):06d}" / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no overlay manifest for version {version}")
    m = json.loads(p.read_text())
    m["root"] = str(root)
    return m


def prune_overlays(overlay_dir, keep: list[dict]) -> int:
    """Delete overlay version folders (and files) that none of the ``keep`` manifests references."""
    root = Path(overlay_dir).expanduser().resolve()
    used = {(Path(m["root"]) / rel).resolve() for m in keep for rel in list(m["buckets"].values()) + [m["ids_file"]]}
    keep_dirs = {f"v{int(m['version']):06d}" for m in keep}
    removed = 0
    for d in sorted(p for p in root.glob("v[0-9]*") if p.is_dir()):
        for f in d.iterdir():
            # a kept version keeps its manifest; any other file lives only while some kept manifest uses it
            if f.resolve() in used or (d.name in keep_dirs and f.name == "manifest.json"):
                continue
            shutil.rmtree(f) if f.is_dir() else f.unlink()
            removed += 1
        if not any(d.iterdir()):
            d.rmdir()
    return removed


class BlendOverlays:
    """The one owner of a run's overlay folder: writing versions, finding manifests, pruning, checking.

    ``manifest(v)`` is the overlay in force at mask version ``v``: the newest version <= v that wrote one (a
    condensation without summary blends keeps the previous overlay). ``prune(keep_versions)`` deletes every
    file that none of those versions' manifests references; the condenser calls it once a checkpoint
    references the newest version, so the folder holds one version's files (plus, between a condensation
    and the next checkpoint, what the previous checkpoint still needs).
    """

    def __init__(self, folder, data_dir, remote: str = "", sync=None):
        self.folder, self.data_dir = Path(folder), data_dir
        # a run in an object store: the folder's URI, and sync() uploads the folder's new files (and deletions)
        self.remote, self.sync = remote, sync

    def _remote(self, m: Optional[dict]) -> Optional[dict]:
        if m is not None and self.remote:
            m["remote_root"] = self.remote
        return m

    def versions(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(d.name[1:]) for d in self.folder.glob("v[0-9]*") if (d / "manifest.json").is_file())

    def manifest(self, version: int, check: bool = False) -> Optional[dict]:
        found = [v for v in self.versions() if v <= int(version)]
        if not found:
            return None
        p = self.folder / f"v{found[-1]:06d}" / "manifest.json"
        try:
            m = self._remote(load_overlay(self.folder, found[-1]))
        except json.JSONDecodeError:
            raise ValueError(f"{p}: corrupt blend manifest (not JSON)") from None
        if check:
            check_overlay(m)
        return m

    def write(self, version: int, tail_ids, lost_ids, weights) -> dict:
        from kcd_ray.data.blend_writer import write_blend_overlay

        m = write_blend_overlay(self.data_dir, self.folder, version, tail_ids, lost_ids, weights,
                                prev_overlay=self.manifest(int(version) - 1))
        if self.sync is not None:  # in the store before the mask that uses it is published
            self.sync()
        return self._remote(m)

    def prune(self, keep_versions) -> int:
        keep = [m for m in (self.manifest(v) for v in keep_versions) if m is not None]
        return prune_overlays(self.folder, keep) if self.folder.is_dir() else 0

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file()) if self.folder.is_dir() else 0


# --------------------------------------------------------------------------- reading (train map)

_BUCKETS: "OrderedDict[str, tuple[np.ndarray, np.ndarray]]" = OrderedDict()
_MAX_CACHED = 2


def _cached_bucket(path: Path, shape) -> tuple[np.ndarray, np.ndarray]:
    key = str(path)  # files are immutable (a new version writes new files): path is a safe key
    hit = _BUCKETS.get(key)
    if hit is None:
        hit = _BUCKETS[key] = _read_bucket_file(path, shape)
        while len(_BUCKETS) > _MAX_CACHED:
            _BUCKETS.popitem(last=False)
    else:
        _BUCKETS.move_to_end(key)
    return hit


def overlay_lookup(manifest: Optional[dict], sample_ids) -> tuple[np.ndarray, np.ndarray]:
    """(hit bool[B], uint8 [hits, H, W, C]): the overlay images of the ids that have one, in batch order."""
    ids = np.asarray(sample_ids, np.int64)
    hit = np.zeros(ids.shape, np.bool_)
    if not manifest:
        return hit, np.zeros((0, 0, 0, 0), np.uint8)
    shape = tuple(manifest["image_shape"])
    out = np.empty((ids.size, *shape), np.uint8)
    b = ids // int(manifest["bucket_size"])
    for bk in np.unique(b).tolist():
        path = _bucket_path(manifest, bk)
        if path is None:
            continue
        o_ids, o_imgs = _cached_bucket(path, shape)
        rows = np.flatnonzero(b == bk)
        pos = np.clip(np.searchsorted(o_ids, ids[rows]), 0, max(len(o_ids) - 1, 0))
        found = o_ids[pos] == ids[rows] if len(o_ids) else np.zeros(rows.size, np.bool_)
        hit[rows[found]] = True
        out[rows[found]] = o_imgs[pos[found]]
    return hit, out[hit]
