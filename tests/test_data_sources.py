"""Sources -> Parquet: real CIFAR pickle layouts, an image folder, digits and the synthetic set.

Each data set is prepared into tmp_path and read back with pyarrow only (no Ray).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kcd_ray.config import DataConfig, SyntheticConfig, load_config
from kcd_ray.data import (DATASETS, DatasetDamagedError, DatasetError, compute_checksum, dataset_dir, load_meta,
                          main_prepare, prepare_dataset, split_files)
from kcd_ray.data.parquet_io import SplitWriter
from kcd_ray.data.sources.folder import SkippedFilesWarning


def read_split(path: Path, split: str):
    files = split_files(path, split)
    assert files, f"no parquet parts in {path / split}"
    return pq.read_table(files).to_pydict(), files


def check_ids(table: dict) -> None:
    ids = np.asarray(table["sample_id"])
    np.testing.assert_array_equal(ids, np.arange(len(ids)))


# --------------------------------------------------------------------------- fake CIFAR folders


def _cifar_images(rng, n):
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def make_cifar10(parent: Path, rng) -> tuple[Path, dict]:
    d = parent / "cifar-10-batches-py"
    d.mkdir(parents=True)
    truth = {"train": ([], []), "test": ([], [])}
    for i in range(1, 6):
        data, labels = _cifar_images(rng, 6), [int(x) for x in rng.integers(0, 10, 6)]
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}_{j}.png".encode() for j in range(6)]}
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
        truth["train"][0].append(data), truth["train"][1].extend(labels)
    data, labels = _cifar_images(rng, 7), [int(x) for x in rng.integers(0, 10, 7)]
    (d / "test_batch").write_bytes(pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                                                 b"data": data, b"filenames": [b"t.png"] * 7}, protocol=2))
    truth["test"][0].append(data), truth["test"][1].extend(labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(pickle.dumps({b"num_cases_per_batch": 6, b"label_names": names,
                                                   b"num_vis": 3072}, protocol=2))
    return d, {k: (np.concatenate(v[0]), np.asarray(v[1])) for k, v in truth.items()}


def make_cifar100(parent: Path, rng) -> tuple[Path, dict]:
    d = parent / "cifar-100-python"
    d.mkdir(parents=True)
    truth = {}
    for split, n in (("train", 40), ("test", 12)):
        data, fine = _cifar_images(rng, n), [int(x) for x in rng.integers(0, 100, n)]
        obj = {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
               b"coarse_labels": [f // 5 for f in fine], b"data": data}
        (d / split).write_bytes(pickle.dumps(obj, protocol=2))
        truth[split] = (data, np.asarray(fine))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                                           b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, protocol=2))
    return d, truth


def planar_to_hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name,maker,n_classes,mean0", [("cifar10", make_cifar10, 10, 0.4914),
                                                        ("cifar100", make_cifar100, 100, 0.5071)])
def test_cifar_round_trip(tmp_path, name, maker, n_classes, mean0):
    rng = np.random.default_rng(1)
    folder, truth = maker(tmp_path / "raw", rng)
    # data.source may name the pickle folder itself or its parent
    for source in (folder, folder.parent):
        cfg = DataConfig(name=name, root=str(tmp_path / f"root-{source.name}"), source=str(source))
        path = prepare_dataset(cfg, verbose=False)
        assert path == dataset_dir(cfg) == tmp_path / f"root-{source.name}" / name
        meta = load_meta(path)
        assert meta["format_version"] == 1 and meta["name"] == name and meta["encoding"] == "raw"
        assert meta["num_classes"] == n_classes == len(meta["class_names"])
        assert meta["image_shape"] == [32, 32, 3] and meta["mean"][0] == mean0 and len(meta["std"]) == 3
        for split in ("train", "test"):
            table, _ = read_split(path, split)
            check_ids(table)
            data, labels = truth[split]
            assert meta["splits"][split]["num_rows"] == len(labels)
            np.testing.assert_array_equal(table["label"], labels)
            got = np.frombuffer(b"".join(table["image"]), np.uint8).reshape(-1, 32, 32, 3)
            np.testing.assert_array_equal(got, planar_to_hwc(data))
            assert compute_checksum(path, split) == meta["splits"][split]["checksum"]
    assert meta["class_names"][:2] == (["airplane", "automobile"] if name == "cifar10" else ["fine0", "fine1"])
    # the same content prepared elsewhere hashes the same
    metas = [load_meta(tmp_path / f"root-{s.name}" / name) for s in (folder, folder.parent)]
    assert metas[0]["splits"] == metas[1]["splits"]


def test_cifar_missing_folder_names_folder_and_files(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "root"), source=str(empty))
    with pytest.raises(DatasetError) as e:
        prepare_dataset(cfg, verbose=False)
    msg = str(e.value)
    assert str(empty) in msg and "cifar-10-batches-py" in msg
    assert "data_batch_1" in msg and "test_batch" in msg and "batches.meta" in msg and "data.download" in msg
    assert not (tmp_path / "root" / "cifar10").exists()
    assert not [p for p in (tmp_path / "root").iterdir()]  # no temp folder left behind

    # a partial folder: the message says which files are missing
    (empty / "cifar-100-python").mkdir()
    (empty / "cifar-100-python" / "train").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cifar-100-python lacks test, meta"):
        prepare_dataset(dataclasses.replace(cfg, name="cifar100"), verbose=False)


def test_cifar_download_path(tmp_path, monkeypatch):
    """data.download=true hands torchvision the folder's parent, then reads what it extracted.

    (torchvision's network fetch is replaced by writing the same layout: no network here.)
    """
    calls = []

    def fake_cifar10(root, train=True, download=False):
        calls.append((root, train, download))
        make_cifar10(Path(root), np.random.default_rng(5))

    monkeypatch.setattr("torchvision.datasets.CIFAR10", fake_cifar10)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "root"), download=True)
    meta = load_meta(prepare_dataset(cfg, verbose=False))
    assert calls == [(str(tmp_path / "root" / "raw"), True, True)]
    assert meta["source"] == str(tmp_path / "root" / "raw" / "cifar-10-batches-py")
    assert meta["splits"]["train"]["num_rows"] == 30


def test_cifar_corrupt_pickle_names_file(tmp_path):
    folder, _ = make_cifar10(tmp_path / "raw", np.random.default_rng(0))
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "root"), source=str(folder))
    with pytest.raises(DatasetError, match="data_batch_3"):
        prepare_dataset(cfg, verbose=False)  # fails after two batches were written
    assert list((tmp_path / "root").iterdir()) == []  # neither the folder nor its temp copy


def test_idempotent_and_checksum_stable(tmp_path):
    folder, _ = make_cifar10(tmp_path / "raw", np.random.default_rng(2))
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "root"), source=str(folder))
    path = prepare_dataset(cfg, verbose=False)
    files = [path / "meta.json", *split_files(path, "train"), *split_files(path, "test")]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    checksum = load_meta(path)["splits"]["train"]["checksum"]
    assert prepare_dataset(cfg, verbose=False) == path
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # nothing rewritten
    # once prepared, the raw folder is no longer needed (e.g. on workers)
    assert prepare_dataset(dataclasses.replace(cfg, source=str(tmp_path / "gone")), verbose=False) == path
    # force rewrites, with the same content hash
    prepare_dataset(cfg, force=True, verbose=False)
    assert (path / "meta.json").stat().st_mtime_ns != stamps[path / "meta.json"]
    assert load_meta(path)["splits"]["train"]["checksum"] == checksum
    # a damaged folder (a part deleted) is never rebuilt silently: the error names the file and
    # asks for --force, which rebuilds it
    gone = split_files(path, "train")[0]
    gone.unlink()
    with pytest.raises(DatasetDamagedError, match=f"{gone}: file missing .*--force"):
        prepare_dataset(cfg, verbose=False)
    assert not gone.exists()
    prepare_dataset(cfg, force=True, verbose=False)
    assert load_meta(path)["splits"]["train"]["checksum"] == checksum == compute_checksum(path, "train")


def test_load_meta_errors_name_the_file(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    with pytest.raises(DatasetError, match=str(d / "meta.json")):
        load_meta(d)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match=f"{d / 'meta.json'}: not a readable meta.json"):
        load_meta(d)
    good = {"format_version": 1, "name": "x", "source": "s", "num_classes": 2, "class_names": ["a", "b"],
            "image_shape": [8, 8, 3], "encoding": "raw", "mean": [0.5] * 3, "std": [0.2] * 3,
            "splits": {"train": {"num_rows": 1, "checksum": ""}, "test": {"num_rows": 1, "checksum": ""}}}
    (d / "meta.json").write_text(json.dumps({**good, "format_version": 7}))
    with pytest.raises(DatasetError, match=r"meta.json: format_version 7 .*expected 1"):
        load_meta(d / "meta.json")
    (d / "meta.json").write_text(json.dumps({k: v for k, v in good.items() if k != "encoding"}))
    with pytest.raises(DatasetError, match="missing keys \\['encoding'\\]"):
        load_meta(d)
    (d / "meta.json").write_text(json.dumps(good))
    assert load_meta(d)["class_names"] == ["a", "b"]


# --------------------------------------------------------------------------- image folder


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root: Path, rng, test_name="val") -> dict:
    """train/{cat,dog}, <test_name>/{cat,dog} with PNG and JPEG files; returns {path: (bytes, class)}."""
    files = {}
    for split, n in (("train", 3), (test_name, 2)):
        for cls, ext in (("cat", ".png"), ("dog", ".jpg"), ("eel", ".JPEG")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
                data = _encode(arr, "PNG" if ext == ".png" else "JPEG")
                p = root / split / cls / f"{cls}{i}{ext}"
                p.write_bytes(data)
                files[p] = (data, cls)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    return files


def test_image_folder_round_trip(tmp_path):
    src = tmp_path / "pets"
    files = make_image_folder(src, np.random.default_rng(3))
    (src / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "train" / "dog" / "empty.png").write_bytes(b"")
    cfg = DataConfig(name="folder", root=str(tmp_path / "root"), source=str(src), image_size=64)
    with pytest.warns(SkippedFilesWarning, match=r"skipped 2 unreadable .*(broken.jpg.*empty.png)"):
        path = prepare_dataset(cfg, verbose=False)
    assert path.name.startswith("folder-pets-64-")
    meta = load_meta(path)
    assert meta["encoding"] == "encoded" and meta["image_shape"] == [64, 64, 3]
    assert meta["class_names"] == ["cat", "dog", "eel"] and meta["num_classes"] == 3
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["test_folder"] == "val"
    by_bytes = {data: cls for data, cls in files.values()}
    for split, n in (("train", 9), ("test", 6)):
        table, _ = read_split(path, split)
        check_ids(table)
        assert meta["splits"][split]["num_rows"] == len(table["label"]) == n
        for blob, label in zip(table["image"], table["label"]):
            assert meta["class_names"][label] == by_bytes[blob]  # bytes stored as-is, labelled by folder
        assert sorted(table["image"]) == sorted(d for p, (d, _) in files.items()
                                                if p.parts[-3] == ("train" if split == "train" else "val"))
        assert compute_checksum(path, split) == meta["splits"][split]["checksum"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # idempotent: no second conversion, no second warning
        assert prepare_dataset(cfg, verbose=False) == path


def test_image_folder_test_dir_and_errors(tmp_path):
    src = tmp_path / "imgs"
    make_image_folder(src, np.random.default_rng(4), test_name="test")
    cfg = DataConfig(name="folder", root=str(tmp_path / "root"), source=str(src), image_size=32)
    meta = load_meta(prepare_dataset(cfg, verbose=False))
    assert meta["test_folder"] == "test" and meta["splits"]["test"]["num_rows"] == 6

    (src / "train" / "fox").mkdir()  # an empty class folder
    cfg2 = dataclasses.replace(cfg, image_size=48)
    with pytest.raises(DatasetError, match=str(src / "train" / "fox")):
        prepare_dataset(cfg2, verbose=False)
    (src / "train" / "fox").rmdir()

    bad = tmp_path / "bad"
    (bad / "train" / "a").mkdir(parents=True)
    (bad / "val" / "a").mkdir(parents=True)
    (bad / "train" / "a" / "x.png").write_bytes(b"junk")
    (bad / "val" / "a" / "y.png").write_bytes(_encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    with pytest.warns(SkippedFilesWarning), pytest.raises(DatasetError, match=f"{bad / 'train'}: no readable images"):
        prepare_dataset(dataclasses.replace(cfg, source=str(bad)), verbose=False)
    nothing = tmp_path / "nothing"
    (nothing / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"{nothing / 'train'}: no class sub-folders"):
        prepare_dataset(dataclasses.replace(cfg, source=str(nothing)), verbose=False)
    with pytest.raises(DatasetError, match="data.source"):
        prepare_dataset(dataclasses.replace(cfg, source=""), verbose=False)
    leftovers = [p.name for p in (tmp_path / "root").iterdir() if p.name.startswith(".")]
    assert leftovers == []


# --------------------------------------------------------------------------- digits


def test_digits(tmp_path, capsys):
    cfg = load_config(overrides=["data.name=digits", f"data.root={tmp_path}", "data.image_size=16"])
    path = main_prepare(cfg)
    out = capsys.readouterr().out
    assert "digits train: 1347 rows, 10 classes, image 16x16x3 (raw)" in out and str(path / "test") in out
    assert path.name == "digits-16"
    meta = load_meta(path)
    train, _ = read_split(path, "train")
    test, _ = read_split(path, "test")
    check_ids(train), check_ids(test)
    assert len(train["label"]) + len(test["label"]) == 1797 and len(test["label"]) == 450
    x = np.frombuffer(b"".join(train["image"]), np.uint8).reshape(-1, 16, 16, 3)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grey replicated
    assert x.max() > 200 and x.min() == 0
    # stratified: every class keeps about a quarter of its samples in test
    tr, te = np.bincount(train["label"], minlength=10), np.bincount(test["label"], minlength=10)
    np.testing.assert_allclose(te / (tr + te), 0.25, atol=0.02)
    np.testing.assert_allclose(meta["mean"], [x.mean() / 255] * 3, atol=1e-5)
    np.testing.assert_allclose(meta["std"], [(x / 255.0).std()] * 3, atol=1e-5)
    # the sklearn originals, scaled to 0..255, are recoverable at size 8
    from sklearn.datasets import load_digits

    p8 = prepare_dataset(dataclasses.replace(cfg.data, image_size=8), verbose=False)
    t8, _ = read_split(p8, "train")
    imgs = np.frombuffer(b"".join(t8["image"]), np.uint8).reshape(-1, 8, 8, 3)[..., 0]
    ref = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    first = np.flatnonzero((ref == imgs[0]).all(axis=(1, 2)))
    assert len(first) >= 1 and load_digits().target[first[0]] == t8["label"][0]


# --------------------------------------------------------------------------- synthetic


def syn_cfg(root, **kw) -> DataConfig:
    base = dict(num_train=600, num_test=200, num_classes=5, image_size=16, duplicate_fraction=0.4, seed=0)
    return DataConfig(name="synthetic", root=str(root), synthetic=SyntheticConfig(**{**base, **kw}))


def test_synthetic_deterministic(tmp_path):
    a = prepare_dataset(syn_cfg(tmp_path / "a"), verbose=False)
    b = prepare_dataset(syn_cfg(tmp_path / "b"), verbose=False)
    c = prepare_dataset(syn_cfg(tmp_path / "a", seed=1), verbose=False)
    assert a.name == b.name != c.name and a.name.startswith("synthetic-")
    ma, mb, mc = load_meta(a), load_meta(b), load_meta(c)
    assert ma["splits"] == mb["splits"] and ma["mean"] == mb["mean"]
    assert ma["splits"]["train"]["checksum"] != mc["splits"]["train"]["checksum"]
    # the test set does not depend on the train-side knobs
    d = prepare_dataset(syn_cfg(tmp_path / "a", duplicate_fraction=0.0, num_train=300), verbose=False)
    assert load_meta(d)["splits"]["test"] == ma["splits"]["test"] != load_meta(d)["splits"]["train"]


def test_synthetic_duplicates_and_learnability(tmp_path):
    path = prepare_dataset(syn_cfg(tmp_path), verbose=False)
    meta = load_meta(path)
    assert meta["extra_columns"] == ["is_duplicate"] and meta["image_shape"] == [16, 16, 3]
    tr, files = read_split(path, "train")
    te, _ = read_split(path, "test")
    assert pq.read_schema(files[0]).field("is_duplicate").type == "int8"
    check_ids(tr)
    dup = np.asarray(tr["is_duplicate"])
    assert dup.sum() == 240 and set(te["is_duplicate"]) == {0}
    y = np.asarray(tr["label"])
    assert (np.bincount(y[dup == 1]) == 48).all() and (np.bincount(y[dup == 0]) == 72).all()
    assert 0 < dup[:300].sum() < 240  # duplicates are spread through the ids, not in one block
    x = np.frombuffer(b"".join(tr["image"]), np.uint8).reshape(-1, 16 * 16 * 3).astype(np.float32)

    def nn_dist(rows):  # mean abs pixel distance to the nearest other row of the same class
        out = []
        for i in rows:
            same = np.flatnonzero((y == y[i]) & (np.arange(len(y)) != i))
            out.append(np.abs(x[same] - x[i]).mean(1).min())
        return np.asarray(out)

    assert nn_dist(np.flatnonzero(dup == 1)[:40]).max() < 2.0  # near-copies: ~1 grey level apart
    assert nn_dist(np.flatnonzero(dup == 0)[:40]).min() > 10.0  # hard samples: far apart

    # Learnable but not by pixel templates: nearest class centroid on shift-invariant features
    # (|FFT|) works, on raw pixels it does much worse.
    xt = np.frombuffer(b"".join(te["image"]), np.uint8).reshape(-1, 16, 16, 3).astype(np.float32)
    yt = np.asarray(te["label"])
    hard = dup == 0

    def ncc(f_train, f_test):
        cent = np.stack([f_train[hard & (y == c)].mean(0) for c in range(5)])
        return (((f_test[:, None] - cent[None]) ** 2).sum(-1).argmin(1) == yt).mean()

    def spec(a):
        return np.abs(np.fft.fft2(a.reshape(len(a), 16, 16, 3), axes=(1, 2))).reshape(len(a), -1)

    acc_spec, acc_pix = ncc(spec(x), spec(xt)), ncc(x, xt.reshape(len(xt), -1))
    assert acc_spec > 0.7 and acc_pix < acc_spec - 0.25, (acc_spec, acc_pix)


# --------------------------------------------------------------------------- writer + registry


def test_split_writer_parts_and_row_groups(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2500, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 2500)
    with SplitWriter(tmp_path / "train", rows_per_group=100, rows_per_file=1000) as w:
        for s in range(0, 2500, 333):  # odd batch sizes: ids and groups must not depend on them
            w.add(labels[s:s + 333], images[s:s + 333])
        info = w.close()
    files = split_files(tmp_path, "train")
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [1000, 1000, 500]
    assert {pq.ParquetFile(f).metadata.row_group(0).num_rows for f in files} == {100}
    t = pq.read_table(files)
    np.testing.assert_array_equal(t["sample_id"].to_numpy(), np.arange(2500))
    assert info == {"num_rows": 2500, "checksum": compute_checksum(tmp_path, "train")}
    with SplitWriter(tmp_path / "one", rows_per_group=1024) as w:
        w.add(labels, images)
        assert w.close()["checksum"] == info["checksum"]
    # the hash sees labels and every pixel
    for name, lab, img in (("lab", np.where(np.arange(2500) == 7, labels + 1, labels), images),
                           ("pix", labels, np.where(np.arange(2500)[:, None, None, None] == 2499, images ^ 1, images))):
        with SplitWriter(tmp_path / name) as w:
            w.add(lab, img)
            assert w.close()["checksum"] != info["checksum"]


def test_stale_temp_folders_are_cleaned(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cfg = syn_cfg(tmp_path, num_train=50, num_test=20)
    key = dataset_dir(cfg).name
    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".tmp-{key}.{host}.{dead.pid}.deadbeef"
    live = tmp_path / f".tmp-{key}.{host}.{os.getpid()}.cafecafe"  # a prepare still running: kept
    for d in (stale, live):
        (d / "train").mkdir(parents=True)
    prepare_dataset(cfg, verbose=False)
    assert not stale.exists() and live.exists()


def test_registry_lists_all_sources():
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "fashion_mnist", "folder", "idx", "synthetic"]
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*known: cifar10"):
        prepare_dataset(DataConfig(name="mnist"), verbose=False)


def test_concurrent_prepares_agree(tmp_path):
    """Several processes/workers preparing the same key at once end with one complete folder."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = syn_cfg(tmp_path, num_train=300, num_test=50)
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: prepare_dataset(cfg, verbose=False), range(3)))
    assert len(set(paths)) == 1 and [p.name for p in tmp_path.iterdir()] == [paths[0].name]
    meta = load_meta(paths[0])
    assert compute_checksum(paths[0], "train") == meta["splits"]["train"]["checksum"]
