"""The on-disk format of a prepared data set: Parquet parts, meta.json, content checksums.

A prepared data set is ``<root>/<key>/`` holding ``meta.json``, ``train/part-00000.parquet ...`` and
``test/part-*.parquet`` (and ``val/`` with a validation split). Columns: ``sample_id`` int64 (dense per split,
0..N-1 for train; a validation split's ids follow the training ids and the test ids follow both; parts sorted by it),
``label`` int64, ``image`` binary, plus optional extra columns readers must ignore. See
docs/ARCHITECTURE.md; ``transforms.py`` and ``pipeline.py`` read exactly this.

Integrity. meta.json holds per split ``num_rows`` and a content ``checksum`` (see ContentHash),
and under ``files`` one record per Parquet part: ``{"train/part-00000.parquet": {"size",
"mtime_ns", "num_rows", "sha256"}}`` (sha256 of the file's bytes). :func:`verify_prepared`
checks a folder against them: footers and row counts always (milliseconds), the full content
check when asked or when a file's size/mtime differs from its record.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
SPLITS = ("train", "test")  # every prepared data set has these
OPTIONAL_SPLITS = ("val",)  # data.val_fraction > 0: a validation split carved out of the training split
ENCODINGS = ("raw", "encoded")
META_FILE = "meta.json"
META_KEYS = ("format_version", "name", "source", "num_classes", "class_names", "image_shape",
             "encoding", "mean", "std", "splits")

# Moderate row groups and several files per large split, so Ray Data can read in parallel
# without one task holding a whole split; a row group is also cut early once it holds 64 MiB
# (large JPEGs), and a file once it holds 256 MiB.
ROWS_PER_GROUP = 1024
ROWS_PER_FILE = 10 * ROWS_PER_GROUP
GROUP_BYTES = 64 * 2**20
FILE_BYTES = 256 * 2**20


class DatasetError(ValueError):
    """A prepared data set or a raw source is missing or malformed; the message names the path."""


class DatasetDamagedError(DatasetError):
    """A prepared data set's files no longer match its meta.json; the message names the file."""


# --------------------------------------------------------------------------- checksums


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, memoryview]:
    """(row lengths, contiguous value bytes) of a binary array without copying each row."""
    if arr.type != pa.binary():
        arr = arr.cast(pa.binary())
    if arr.null_count:
        raise DatasetError("image column holds nulls")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype="<i4")[arr.offset: arr.offset + len(arr) + 1]
    data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
    return np.diff(offsets).astype("<i8"), data[offsets[0]: offsets[-1]]


class ContentHash:
    """sha256 over sample ids, labels, image lengths and image bytes, in row order.

    Each stream is hashed on its own, so the digest does not depend on how rows were batched
    when written or read back.
    """

    def __init__(self):
        self._h = {k: hashlib.sha256() for k in ("ids", "labels", "lengths", "images")}

    def update(self, ids, labels, images: pa.Array) -> None:
        self._h["ids"].update(np.asarray(ids, dtype="<i8").tobytes())
        self._h["labels"].update(np.asarray(labels, dtype="<i8").tobytes())
        lengths, data = _binary_parts(images)
        self._h["lengths"].update(lengths.tobytes())
        self._h["images"].update(data)

    def hexdigest(self) -> str:
        top = hashlib.sha256(b"kcd_ray-format-1")
        for k in ("ids", "labels", "lengths", "images"):
            top.update(self._h[k].digest())
        return top.hexdigest()


# --------------------------------------------------------------------------- writing


def images_to_arrow(images: Union[np.ndarray, Sequence[bytes], pa.Array, pa.ChunkedArray]) -> pa.Array:
    """uint8 [N, ...] array (one row per image), a list of bytes or an Arrow binary column -> pa.binary() array."""
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks()
    if isinstance(images, pa.Array):
        return images if images.type == pa.binary() else images.cast(pa.binary())
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"raw images must be uint8, got {images.dtype}")
        n = len(images)
        flat = np.ascontiguousarray(images).reshape(n, -1)
        row = flat.shape[1] if n else 0
        offsets = np.arange(n + 1, dtype=np.int32) * row
        return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])
    return pa.array(list(images), type=pa.binary())


class SplitWriter:
    """Streams rows of one split into ``part-NNNNN.parquet`` files, assigning dense sample ids (from ``first_id``).

    ``add(labels, images, extra)`` takes any batch size; ``close()`` returns
    ``{"num_rows", "checksum"}`` for meta.json.
    """

    def __init__(self, split_dir: Path, extra: Optional[Mapping[str, pa.DataType]] = None,
                 rows_per_group: int = ROWS_PER_GROUP, rows_per_file: int = ROWS_PER_FILE, first_id: int = 0):
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = dict(extra or {})
        self.schema = pa.schema([("sample_id", pa.int64()), ("label", pa.int64()), ("image", pa.binary())]
                                + list(self.extra.items()))
        self.rows_per_group, self.rows_per_file = rows_per_group, rows_per_file
        self._pending: list[pa.Table] = []
        self._pending_rows = self._pending_bytes = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._file_rows = self._file_bytes = 0
        self._n_files = 0
        self.num_rows = 0
        self.first_id = int(first_id)  # ids first_id, first_id + 1, ... (a split renumbered after another)
        self._hash = ContentHash()
        self._info: Optional[dict] = None

    def add(self, labels, images, extra: Optional[Mapping[str, np.ndarray]] = None) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        img = images_to_arrow(images)
        if len(img) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(img)} images")
        extra = dict(extra or {})
        if set(extra) != set(self.extra):
            raise ValueError(f"extra columns {sorted(extra)} differ from the declared {sorted(self.extra)}")
        ids = np.arange(self.num_rows, self.num_rows + len(labels), dtype=np.int64) + self.first_id
        self._hash.update(ids, labels, img)
        cols = [pa.array(ids), pa.array(labels), img] + [pa.array(np.asarray(extra[k]), type=t)
                                                         for k, t in self.extra.items()]
        self._pending.append(pa.Table.from_arrays(cols, schema=self.schema))
        self._pending_rows += len(labels)
        self._pending_bytes += img.nbytes
        self.num_rows += len(labels)
        while self._pending_rows >= self.rows_per_group or (self._pending_bytes >= GROUP_BYTES and self._pending_rows):
            self._flush(min(self.rows_per_group, self._pending_rows))

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._pending).combine_chunks()
        if self._pending_bytes >= GROUP_BYTES:  # cut the group by size: rows up to 64 MiB
            lengths, _ = _binary_parts(table.column("image").chunk(0))
            n = max(1, min(n, int(np.searchsorted(np.cumsum(lengths), GROUP_BYTES)) + 1))
        head, rest = table.slice(0, n), table.slice(n)
        if self._writer is None or self._file_rows >= self.rows_per_file or self._file_bytes >= FILE_BYTES:
            self._open_next()
        self._writer.write_table(head, row_group_size=n)
        self._file_rows += n
        self._file_bytes += head.column("image").nbytes
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)
        self._pending_bytes = rest.column("image").nbytes if len(rest) else 0

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.dir / f"part-{self._n_files:05d}.parquet"
        self._n_files += 1
        small = ["sample_id", "label"] + list(self.extra)
        # Statistics and dictionaries only for the small columns: min/max of image bytes would
        # bloat the footer and dictionary-encoding unique images is wasted work.
        self._writer = pq.ParquetWriter(path, self.schema, write_statistics=small, use_dictionary=small)
        self._file_rows = self._file_bytes = 0

    def close(self) -> dict:
        if self._info is not None:
            return self._info
        while self._pending_rows:
            self._flush(min(self.rows_per_group, self._pending_rows))
        if self._writer is None:  # an empty split still gets one (empty) file with the schema
            self._open_next()
        self._writer.close()
        self._writer = None
        self._info = {"num_rows": int(self.num_rows), "checksum": self._hash.hexdigest()}
        return self._info

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # the caller discards the folder; just release the file
            self._writer.close()


# --------------------------------------------------------------------------- reading


def splits_of(meta: dict) -> tuple[str, ...]:
    """The splits a prepared data set holds: train, test, and val when it has a validation split."""
    return SPLITS + tuple(s for s in OPTIONAL_SPLITS if s in (meta.get("splits") or {}))


def split_files(data_dir: Union[str, os.PathLike], split: str) -> list[Path]:
    """The Parquet parts of a split, in sample-id order."""
    return sorted((Path(data_dir) / split).glob("part-*.parquet"))


def count_rows(data_dir: Union[str, os.PathLike], split: str) -> int:
    """Rows of a split from the Parquet footers only (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in split_files(data_dir, split))


def iter_split(data_dir: Union[str, os.PathLike], split: str, columns: Optional[Iterable[str]] = None,
               batch_size: int = ROWS_PER_GROUP) -> Iterable[pa.RecordBatch]:
    """Record batches of a split in sample-id order (reads one row group at a time)."""
    for f in split_files(data_dir, split):
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)


def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _hint(data_dir: Path) -> str:
    return (f"the prepared data set {data_dir} is damaged: prepare it again with `kcd-ray prepare-data "
            f"<same config> --force` (prepare_dataset(..., force=True)), or delete {data_dir}")


def _damaged(path: Path, what: str, data_dir: Optional[Path] = None) -> DatasetDamagedError:
    """One line: ``<path>: <what>; <how to repair>``."""
    root = Path(data_dir) if data_dir is not None else Path(path).parent.parent
    return DatasetDamagedError(f"{path}: {what}; {_hint(root)}")


def compute_checksum(data_dir: Union[str, os.PathLike], split: str) -> str:
    """Recompute a split's content hash from its files (equals meta's checksum when intact).

    An unreadable file raises :class:`DatasetDamagedError` naming it.
    """
    h = ContentHash()
    for f in split_files(data_dir, split):
        try:
            for b in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_GROUP, columns=["sample_id", "label", "image"]):
                h.update(b.column(0).to_numpy(), b.column(1).to_numpy(), b.column(2))
        except (OSError, pa.ArrowException, ValueError, KeyError) as e:
            raise _damaged(f, f"unreadable Parquet data in split {split!r} ({type(e).__name__}: {_oneline(e)})",
                           Path(data_dir)) from None
    return h.hexdigest()


# --------------------------------------------------------------------------- meta.json


def write_meta(data_dir: Union[str, os.PathLike], meta: dict) -> Path:
    """Write meta.json atomically (a unique temp file renamed into place: concurrent writers are safe)."""
    path = Path(data_dir) / META_FILE
    tmp = path.with_name(f".{META_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_meta(path: Union[str, os.PathLike]) -> dict:
    """Read and check ``meta.json`` of a prepared data set (``path``: the folder or the file)."""
    p = Path(path).expanduser()
    if p.is_dir() or p.name != META_FILE:
        p = p / META_FILE
    if not p.is_file():
        raise DatasetError(f"{p}: meta.json not found; prepare the data set first (kcd-ray prepare-data)")
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{p}: not a readable meta.json ({e}); delete the folder and prepare it again") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{p}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"{p}: missing keys {missing}; expected {list(META_KEYS)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{p}: format_version {meta['format_version']!r} is not supported; expected "
                           f"{FORMAT_VERSION} (prepare the data set again)")
    if meta["encoding"] not in ENCODINGS:
        raise DatasetError(f"{p}: encoding {meta['encoding']!r}; expected one of {ENCODINGS}")
    shape = meta["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise DatasetError(f"{p}: image_shape {shape!r}; expected [H, W, C] positive integers")
    splits = meta["splits"]
    for s in SPLITS:
        if not isinstance(splits, dict) or not isinstance(splits.get(s), dict) or "num_rows" not in splits[s]:
            raise DatasetError(f"{p}: splits.{s}.num_rows missing")
    if len(meta["class_names"]) != meta["num_classes"]:
        raise DatasetError(f"{p}: {len(meta['class_names'])} class_names but num_classes={meta['num_classes']}")
    return meta


# --------------------------------------------------------------------------- integrity

def _first_id(path: Path) -> int:
    """The split's first sample id (0, or where a renumbered split starts): the first row of its first file."""
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows == 0:
        return 0
    return int(pf.read_row_group(0, columns=["sample_id"]).column(0)[0].as_py())


def locate_sample(data_dir: Union[str, os.PathLike], split: str, sample_id: int) -> dict:
    """Where a row lives: ``{"file": Path, "row": int (in the file), "source_path": str | None}``.

    Uses the footers (ids are dense and files sorted by id) and reads one row group, and only the
    ``source_path`` column (image folders store it: the original file, relative to meta's
    ``source``); empty dict when the id is out of range. For error messages, not hot paths.
    """
    root = Path(data_dir).expanduser()
    files = split_files(root, split)
    start = _first_id(files[0]) if files else 0
    for f in files:
        pf = pq.ParquetFile(f)
        n = pf.metadata.num_rows
        if start <= sample_id < start + n:
            row, out = int(sample_id - start), {"file": f, "row": int(sample_id - start), "source_path": None}
            if "source_path" in pf.schema_arrow.names:
                g = 0
                while row >= pf.metadata.row_group(g).num_rows:
                    row -= pf.metadata.row_group(g).num_rows
                    g += 1
                rel = pf.read_row_group(g, columns=["source_path"]).column(0)[row].as_py()
                if rel:
                    try:
                        src = load_meta(root).get("source")
                    except DatasetError:
                        src = None
                    out["source_path"] = str(Path(src) / rel) if src else rel
            return out
        start += n
    return {}
