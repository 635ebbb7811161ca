"""Checking a prepared data set against its ``meta.json``: cheap checks on every start-up (footers, row counts,
file records), every byte when files changed (``verify_prepared``); damage is one line naming the file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from kcd_ray.data.parquet_io import (META_FILE, ROWS_PER_GROUP, ContentHash, DatasetError, _damaged, _oneline,
                                     load_meta, split_files, splits_of, write_meta)
from kcd_ray.data.parquet_io import OPTIONAL_SPLITS, SPLITS


FILES_KEY = "files"


def _rel(split: str, f: Path) -> str:
    return f"{split}/{f.name}"


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _damaged(path, f"unreadable ({e})") from None


def file_records(data_dir: Union[str, os.PathLike]) -> dict:
    """``{"<split>/part-NNNNN.parquet": {"size", "mtime_ns", "num_rows", "sha256"}}`` of every part.

    What ``prepare_dataset`` stores under meta.json's ``files`` key (reads every file once).
    """
    out = {}
    for s in SPLITS + OPTIONAL_SPLITS:  # a split's folder present on disk (val: only with a validation split)
        for f in split_files(data_dir, s) if (Path(data_dir) / s).is_dir() else []:
            data = _read_file(f)
            out[_rel(s, f)] = _record(f, pq.read_metadata(pa.BufferReader(data)).num_rows, _sha256(data))
    return out


def _record(f: Path, num_rows: int, sha256: Optional[str]) -> dict:
    st = f.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "num_rows": int(num_rows), "sha256": sha256}


def _full_split(data_dir: Path, meta: dict, split: str, files: list[Path], records: Optional[dict]) -> dict:
    """Read every byte of a split: file sha256 against its record (when recorded), every Parquet page
    decoded, content checksum against meta. Returns fresh records of the split's files."""
    h = ContentHash()
    fresh = {}
    for f in files:
        data = _read_file(f)
        digest = _sha256(data)
        rec = (records or {}).get(_rel(split, f)) or {}
        if rec.get("sha256") and rec["sha256"] != digest:
            raise _damaged(f, f"checksum mismatch for split {split!r}: the file's sha256 is {digest[:16]}..., "
                              f"meta.json recorded {rec['sha256'][:16]}...", data_dir)
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
            n = pf.metadata.num_rows
            for b in pf.iter_batches(batch_size=ROWS_PER_GROUP, columns=["sample_id", "label", "image"]):
                h.update(b.column(0).to_numpy(), b.column(1).to_numpy(), b.column(2))
        except (OSError, pa.ArrowException, ValueError, KeyError) as e:
            raise _damaged(f, f"unreadable Parquet data in split {split!r} ({type(e).__name__}: {_oneline(e)})",
                           data_dir) from None
        fresh[_rel(split, f)] = _record(f, n, digest)
    want, got = meta["splits"][split].get("checksum"), h.hexdigest()
    if want and want != got:
        where = files[0] if len(files) == 1 else data_dir / split
        which = "" if len(files) == 1 else f" (one of its {len(files)} part files)"
        raise _damaged(where, f"checksum mismatch for split {split!r}{which} (expected {want[:16]}..., "
                              f"got {got[:16]}...)", data_dir)
    return fresh


def verify_prepared(data_dir: Union[str, os.PathLike], full: Optional[bool] = None) -> dict:
    """Check a prepared data set against its meta.json; return the meta dict (as :func:`load_meta`).

    Always (cheap: meta.json, ``stat`` and the Parquet footers, milliseconds even at ImageNet size):
    every split has part files, each file's footer parses, the files are exactly those recorded
    under meta's ``files`` with their recorded row count and size, and the rows of each split sum
    to ``splits.<split>.num_rows``.

    ``full=True``: also read every byte: each file's sha256 against its record, every Parquet page
    decoded, and each split's content checksum recomputed (:func:`compute_checksum`) and compared
    with meta. ``full=None`` (the default): the full check only for the splits holding a file whose
    size or mtime differs from its record (a copied or touched folder), or for every split when
    meta.json has no ``files`` records (prepared by an older version); after such a check passes,
    the records are refreshed in meta.json (best effort: a read-only folder is left as it is) so
    the next call is cheap again. ``full=False``: the cheap checks only.

    Raises :class:`DatasetDamagedError` (a :class:`DatasetError`) with one line naming the damaged
    file (or split folder when the damage cannot be pinned to one file) and how to repair it; a
    missing or malformed meta.json raises :class:`DatasetError` from :func:`load_meta`.
    Safe to call concurrently from several processes. Stable signature: run start-up calls
    ``verify_prepared(data_dir)``.
    """
    root = Path(data_dir).expanduser()
    meta = load_meta(root)
    records = meta.get(FILES_KEY)
    if records is not None and not isinstance(records, dict):
        raise DatasetError(f"{root / META_FILE}: {FILES_KEY!r} is a {type(records).__name__}; expected an object")
    files, to_check = {}, []
    for s in splits_of(meta):
        files[s], stale = _cheap_split(root, meta, s, records)
        if full or (full is None and (records is None or stale)):
            to_check.append(s)
    return _full_checks(root, meta, to_check, files, records) if to_check else meta


def _cheap_split(root: Path, meta: dict, s: str, records: Optional[dict]) -> tuple[list[Path], bool]:
    """The cheap checks of split ``s`` (file list against the records, footers, row counts, sizes): its files,
    and whether any file's mtime differs from its record (a copied or touched folder)."""
    files = split_files(root, s)
    if records is not None:
        have = {_rel(s, f) for f in files}
        want = {k for k in records if k.startswith(s + "/")}
        if want - have:
            raise _damaged(root / sorted(want - have)[0], "file missing (listed in meta.json)", root)
        if have - want:
            raise _damaged(root / sorted(have - want)[0], "unexpected file (not listed in meta.json)", root)
    if not files:
        raise _damaged(root / s, "no part-*.parquet files", root)
    total, stale = 0, False
    for f in files:
        try:
            st = f.stat()
            n = pq.read_metadata(f).num_rows
        except (OSError, pa.ArrowException) as e:
            raise _damaged(f, f"unreadable Parquet footer ({type(e).__name__}: {_oneline(e)})", root) from None
        rec = (records or {}).get(_rel(s, f))
        if rec is not None:
            if n != rec.get("num_rows"):
                raise _damaged(f, f"{n} rows in the Parquet footer but meta.json recorded {rec.get('num_rows')}", root)
            if st.st_size != rec.get("size"):
                raise _damaged(f, f"{st.st_size} bytes but meta.json recorded {rec.get('size')}", root)
            stale |= st.st_mtime_ns != rec.get("mtime_ns")
        total += n
    want_rows = meta["splits"][s]["num_rows"]
    if total != want_rows:
        raise _damaged(root / s, f"{total} rows in the Parquet files but meta.json says {want_rows}", root)
    return files, stale


def _full_checks(root: Path, meta: dict, splits: list[str], files: dict, records: Optional[dict]) -> dict:
    """Every byte of ``splits`` read and checked; the verified file records refreshed in meta.json (best effort:
    a read-only folder is left as it is) so the next start-up is cheap again. Returns the meta."""
    fresh = {}
    for s in splits:
        fresh.update(_full_split(root, meta, s, files[s], records))
    new = {**(records or {}), **fresh}
    if records is None:
        new = {k: new[k] for k in sorted(new)}
    if new != records:
        try:
            write_meta(root, {**meta, FILES_KEY: new})
            meta = {**meta, FILES_KEY: new}
        except OSError:
            pass
    return meta


def check_prepared(data_dir: Union[str, os.PathLike]) -> dict:
    """Quick integrity check (footers, row counts, file records): ``verify_prepared(data_dir, full=False)``."""
    return verify_prepared(data_dir, full=False)


