"""Integrity of prepared data sets: checksums verified, damaged files named,
undecodable images left out at prepare time, run-time decode errors naming the sample.

Every data set is made here (synthetic generator, tiny image folders); no network, no Ray.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kcd_ray.config import DataConfig, SyntheticConfig, load_config
from kcd_ray.data import (DatasetDamagedError, DatasetError, check_prepared, compute_checksum, load_meta,
                          locate_sample, main_prepare, prepare_dataset, split_files, verify_prepared)
from kcd_ray.data import verify
from kcd_ray.data import transforms as T
from kcd_ray.data.parquet_io import SplitWriter, write_meta
from kcd_ray.data.sources.folder import SkippedFilesWarning


def syn_cfg(root, **kw) -> DataConfig:
    base = dict(num_train=1500, num_test=100, num_classes=3, image_size=16, seed=0)
    return DataConfig(name="synthetic", root=str(root), synthetic=SyntheticConfig(**{**base, **kw}))


@pytest.fixture()
def prepared(tmp_path):
    cfg = syn_cfg(tmp_path / "root")
    return cfg, prepare_dataset(cfg, verbose=False)


def train_part(path: Path) -> Path:
    (f,) = split_files(path, "train")
    return f


def overwrite(f: Path, offset: int, data: bytes, keep_mtime: bool) -> None:
    """Same-size corruption of ``f`` at ``offset``; optionally restore the mtime (a bit-rot / sly copy)."""
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    if keep_mtime:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert f.stat().st_size == st.st_size


def flip_middle(f: Path, keep_mtime: bool = True) -> None:
    """Invert 64 bytes in the middle of the file (inside the image column's pages)."""
    data = f.read_bytes()
    mid = len(data) // 2
    overwrite(f, mid, bytes(b ^ 0xFF for b in data[mid:mid + 64]), keep_mtime)


def one_line_naming(err: pytest.ExceptionInfo, f: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{f}: "), msg
    assert "--force" in msg, msg
    return msg


def drop_file_records(path: Path) -> None:
    meta = load_meta(path)
    meta.pop("files", None)
    write_meta(path, meta)


# --------------------------------------------------------------------------- checksums


def test_meta_records_every_file(prepared):
    _, path = prepared
    meta = load_meta(path)
    files = [*split_files(path, "train"), *split_files(path, "test")]
    assert sorted(meta["files"]) == sorted(f"{f.parent.name}/{f.name}" for f in files)
    for f in files:
        rec = meta["files"][f"{f.parent.name}/{f.name}"]
        st = f.stat()
        assert rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns
        assert rec["num_rows"] == pq.read_metadata(f).num_rows and len(rec["sha256"]) == 64
    assert verify_prepared(path) == meta == verify_prepared(path, full=True) == check_prepared(path)


def test_full_check_detects_same_size_corruption_and_names_file(prepared):
    cfg, path = prepared
    f = train_part(path)
    checksum = load_meta(path)["splits"]["train"]["checksum"]
    flip_middle(f, keep_mtime=True)
    verify_prepared(path)  # same size, same mtime: the cheap check cannot see it (by design)
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path, full=True)
    msg = one_line_naming(e, f)
    assert "checksum mismatch for split 'train'" in msg and f"delete {path}" in msg

    # without the per-file records (a meta.json of an older version) decoding every page and the
    # split's content checksum still catch it, naming the file (the split has one file)
    drop_file_records(path)
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path, full=True)
    msg = one_line_naming(e, f)
    assert "checksum mismatch for split 'train'" in msg or "unreadable Parquet data in split 'train'" in msg

    # `kcd-ray prepare-data` (main_prepare) reads everything: it fails naming the file, and --force repairs
    full_cfg = load_config(overrides=[f"data.{k}={v}" for k, v in (("name", "synthetic"), ("root", cfg.root))]
                           + [f"data.synthetic.{k}={v}" for k, v in dataclasses.asdict(cfg.synthetic).items()])
    with pytest.raises(DatasetDamagedError) as e:
        main_prepare(full_cfg)
    one_line_naming(e, f)
    assert main_prepare(full_cfg, force=True) == path
    assert verify_prepared(path, full=True)["splits"]["train"]["checksum"] == checksum
    assert compute_checksum(path, "train") == checksum

    # content that decodes but differs from meta's checksum (no file records to compare first)
    drop_file_records(path)
    meta = load_meta(path)
    meta["splits"]["test"]["checksum"] = "0" * 64  # content that decodes but differs from the checksum
    write_meta(path, meta)
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path, full=True)
    msg = one_line_naming(e, split_files(path, "test")[0])
    assert "checksum mismatch for split 'test' (expected 0000000000000000..., got" in msg


def test_corrupt_parquet_page_names_file(prepared):
    """A damaged page header makes pyarrow raise OSError; the error names the file."""
    _, path = prepared
    f = train_part(path)
    page = pq.read_metadata(f).row_group(0).column(2).data_page_offset  # the image column's first page
    drop_file_records(path)  # no file sha256 to compare: the pages themselves must be read
    overwrite(f, page, b"\xff" * 48, keep_mtime=True)
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path, full=True)
    msg = one_line_naming(e, f)
    assert "unreadable Parquet data in split 'train'" in msg and "OSError" in msg


def test_cheap_check_detects_truncation_and_row_counts(prepared, monkeypatch):
    _, path = prepared
    # the cheap path never reads data pages
    monkeypatch.setattr(verify, "_full_split", lambda *a, **k: pytest.fail("full check on the cheap path"))
    verify_prepared(path)
    verify_prepared(path, full=False)
    f = train_part(path)
    good = f.read_bytes()
    st = f.stat()

    # truncated: the footer is gone
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path, full=False)
    assert "unreadable Parquet footer" in one_line_naming(e, f)
    drop_file_records(path)  # same without the per-file records
    with pytest.raises(DatasetDamagedError) as e:
        check_prepared(path)
    assert "unreadable Parquet footer" in one_line_naming(e, f)

    # a valid Parquet file with fewer rows in place of the part
    f.write_bytes(good)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.undo()
    prepare_dataset(syn_cfg(path.parent), verbose=False, full_check=True)  # intact again; records back
    monkeypatch.setattr(verify, "_full_split", lambda *a, **k: pytest.fail("full check on the cheap path"))
    assert "files" in load_meta(path)
    pq.write_table(pq.read_table(f).slice(0, 1000), f)
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path, full=False)
    assert "1000 rows in the Parquet footer but meta.json recorded 1500" in one_line_naming(e, f)

    # meta.json's row count disagrees with the files: the split folder is named
    f.write_bytes(good)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    meta = load_meta(path)
    meta["splits"]["test"]["num_rows"] += 1
    write_meta(path, meta)
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path)
    assert "100 rows in the Parquet files but meta.json says 101" in one_line_naming(e, path / "test")

    # a part file missing, or one too many
    meta["splits"]["test"]["num_rows"] -= 1
    write_meta(path, meta)
    verify_prepared(path)
    extra = path / "train" / "part-00001.parquet"
    extra.write_bytes(good)
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path)
    assert "unexpected file (not listed in meta.json)" in one_line_naming(e, extra)
    extra.unlink()
    f.unlink()
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path)
    assert "file missing" in one_line_naming(e, f)


def test_changed_mtime_triggers_full_check_once(prepared, monkeypatch):
    _, path = prepared
    f = train_part(path)
    calls = []
    real = verify._full_split
    monkeypatch.setattr(verify, "_full_split", lambda root, meta, split, *a: calls.append(split) or
                        real(root, meta, split, *a))

    # corrupted and touched (mtime changed): the default check reads the changed split and fails
    good = f.read_bytes()
    st = f.stat()
    flip_middle(f, keep_mtime=False)
    with pytest.raises(DatasetDamagedError) as e:
        verify_prepared(path)
    assert "checksum mismatch for split 'train'" in one_line_naming(e, f)
    assert calls == ["train"]

    # intact but touched (e.g. copied without -p): one full check of that split, then cheap again
    f.write_bytes(good)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls.clear()
    verify_prepared(path)
    assert calls == ["train"]
    assert load_meta(path)["files"]["train/part-00000.parquet"]["mtime_ns"] == f.stat().st_mtime_ns  # refreshed
    verify_prepared(path)
    assert calls == ["train"]

    # a meta.json without file records (older version): checked in full once, then recorded
    drop_file_records(path)
    calls.clear()
    verify_prepared(path)
    assert calls == ["train", "test"] and "files" in load_meta(path)
    verify_prepared(path)
    assert calls == ["train", "test"]
    # full=False never reads, full=True always does
    verify_prepared(path, full=False)
    assert calls == ["train", "test"]
    verify_prepared(path, full=True)
    assert calls == ["train", "test", "train", "test"]


def test_prepare_dataset_on_damaged_set_fails_naming_file(prepared):
    cfg, path = prepared
    f = train_part(path)
    checksum = load_meta(path)["splits"]["train"]["checksum"]
    stamps = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    original = f.read_bytes()
    flip_middle(f, keep_mtime=True)
    damaged = f.read_bytes()
    # the default (run start-up) path: size and mtime unchanged, so only the cheap check
    assert prepare_dataset(cfg, verbose=False) == path
    # a full check (what `kcd-ray prepare-data` does) fails, and nothing is rebuilt or deleted
    with pytest.raises(DatasetDamagedError) as e:
        prepare_dataset(cfg, verbose=False, full_check=True)
    one_line_naming(e, f)
    # mtime changed: the default path catches it too
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000_000))
    with pytest.raises(DatasetDamagedError) as e:
        prepare_dataset(cfg, verbose=False)
    one_line_naming(e, f)
    assert f.read_bytes() == damaged != original  # no silent rebuild (nor deletion)
    assert set(stamps) == set(path.rglob("*"))
    with pytest.raises(DatasetDamagedError) as e:  # compute_checksum names the file too
        compute_checksum(path, "train")
    one_line_naming(e, f)
    # the source is a generator, so --force rebuilds the same content
    prepare_dataset(cfg, force=True, verbose=False)
    assert verify_prepared(path, full=True)["splits"]["train"]["checksum"] == checksum


def test_verify_errors_for_missing_meta(tmp_path):
    with pytest.raises(DatasetError, match="meta.json not found"):
        verify_prepared(tmp_path)


def test_locate_sample_across_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2500, 2, 2, 3), dtype=np.uint8)
    with SplitWriter(tmp_path / "train", rows_per_group=100, rows_per_file=1000) as w:
        w.add(np.zeros(2500, np.int64), images)
    files = split_files(tmp_path, "train")
    assert locate_sample(tmp_path, "train", 0) == {"file": files[0], "row": 0, "source_path": None}
    assert locate_sample(tmp_path, "train", 999)["row"] == 999
    assert locate_sample(tmp_path, "train", 1000) == {"file": files[1], "row": 0, "source_path": None}
    assert locate_sample(tmp_path, "train", 2499) == {"file": files[2], "row": 499, "source_path": None}
    assert locate_sample(tmp_path, "train", 2500) == {}


# --------------------------------------------------------------------------- image folders


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path, rng) -> None:
    for split, n in (("train", 4), ("val", 2)):
        for cls, fmt in (("cat", "PNG"), ("dog", "JPEG")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
                (root / split / cls / f"{cls}{i}.{'png' if fmt == 'PNG' else 'jpg'}").write_bytes(_encode(arr, fmt))


def test_truncated_images_are_skipped_and_listed(tmp_path, capsys):
    src = tmp_path / "pets"
    rng = np.random.default_rng(1)
    make_folder(src, rng)
    big = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    jpg, png = _encode(big, "JPEG"), _encode(big, "PNG")
    bad = {src / "train" / "dog" / "cut.jpg": jpg[: len(jpg) // 2],   # headers parse: only a decode sees it
           src / "train" / "cat" / "cut.png": png[: len(png) // 2],
           src / "val" / "dog" / "cut_end.jpg": jpg[:-2]}             # even the last 2 bytes (EOI) matter
    for p, data in bad.items():
        p.write_bytes(data)
        with Image.open(p) as im:  # what the old header check accepted
            assert im.width == 48
    cfg = load_config(overrides=["data.name=folder", f"data.root={tmp_path / 'root'}", f"data.source={src}",
                                 "data.image_size=16"])
    with pytest.warns(SkippedFilesWarning) as rec:
        path = main_prepare(cfg)
    shown = " ".join(str(w.message) for w in rec)
    assert all(str(p) in shown for p in bad) and "does not decode" in shown
    meta = load_meta(path)
    assert meta["splits"]["train"]["num_rows"] == 8 and meta["splits"]["test"]["num_rows"] == 4
    assert set(meta["skipped_files"]["train"]) == {str(p) for p in bad if "train" in p.parts}
    assert list(meta["skipped_files"]["test"]) == [str(src / "val" / "dog" / "cut_end.jpg")]
    assert "JPEG does not decode" in meta["skipped_files"]["train"][str(src / "train" / "dog" / "cut.jpg")]
    assert "PNG does not decode" in meta["skipped_files"]["train"][str(src / "train" / "cat" / "cut.png")]
    out = capsys.readouterr().out
    assert "folder train: skipped 2 unreadable source file(s)" in out and str(src / "train" / "dog" / "cut.jpg") in out
    assert "folder test: skipped 1" in out
    # what remains decodes, every row, with the run-time decoder; each row names its source file
    for split in ("train", "test"):
        table = pq.read_table(split_files(path, split)).to_pydict()
        x = T.decode_images(table["image"], meta, sample_ids=table["sample_id"], split=split, data_dir=path)
        assert x.shape == (len(table["image"]), 16, 16, 3)
        for rel, blob in zip(table["source_path"], table["image"]):
            assert (Path(meta["source"]) / rel).read_bytes() == blob
    verify_prepared(path, full=True)


def test_runtime_decode_error_names_sample(tmp_path):
    src = tmp_path / "pets"
    make_folder(src, np.random.default_rng(2))
    cfg = DataConfig(name="folder", root=str(tmp_path / "root"), source=str(src), image_size=16)
    path = prepare_dataset(cfg, verbose=False)
    meta = load_meta(path)
    table = pq.read_table(split_files(path, "train")).to_pydict()
    good, victim = table["image"][0], table["image"][5]
    images = [good, victim[: len(victim) // 2]]  # the row's bytes as if damaged after preparation

    # no ids: the batch position, as before
    with pytest.raises(T.ImageDecodeError, match=r"^image\[1\]: not a decodable PNG/JPEG file"):
        T.decode_images(images, meta)
    # ids: the sample id is named
    with pytest.raises(T.ImageDecodeError, match=r"image\[1\] \(sample_id 5\): not a decodable") as e:
        T.decode_images(images, meta, sample_ids=np.array([0, 5]))
    assert e.value.sample_id == 5 and e.value.index == 1
    # ids, split and folder: also the Parquet file and the original source file
    with pytest.raises(ValueError) as e:
        T.decode_images(images, meta, sample_ids=np.array([0, 5]), split="train", data_dir=path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"sample_id 5 of split 'train', row 5 of {split_files(path, 'train')[0]}" in msg
    assert f"source file {src / table['source_path'][5]}" in msg
    # raw images too
    raw = {"image_shape": [2, 2, 3], "encoding": "raw"}
    with pytest.raises(T.ImageDecodeError, match=r"image\[0\] \(sample_id 42 of split 'test'\): raw image has 3"):
        T.decode_images([b"abc"], raw, sample_ids=[42], split="test")
