"""The idx / fashion_mnist sources (MNIST-style IDX files) and data.train_subset, on small IDX files written here.

CI has no dataset-fashion-mnist package: every test writes its own files (a few dozen 28x28 images, gzipped and
not); one test reads the installed package's label files when they are there.
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kcd_ray.config import ConfigError, DataConfig, load_config
from kcd_ray.data import DatasetError, dataset_dir, iter_split, load_meta, prepare_dataset, split_files
from kcd_ray.data import transforms as T
from kcd_ray.data.sources.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fit_size, parse_idx, read_idx
from kcd_ray.data.subset import stratified_subset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
         np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    """An IDX file's bytes, written independently of the reader: magic (0, 0, dtype code, ndim), dims, values."""
    a = np.asarray(a)
    big = a.astype(a.dtype.newbyteorder(">")) if a.dtype.itemsize > 1 else a
    return bytes([0, 0, CODES[big.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + big.tobytes()


def write_idx_folder(folder: Path, rng, n_train=40, n_test=12, gz=True, classes=10) -> dict:
    """The four standard files (gzipped or not); returns {split: (images [N, 28, 28], labels [N])}."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        rng.shuffle(labels)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        truth[split] = (images, labels.astype(np.int64))
    return truth


def read_images(path: Path, split: str, shape) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(split_files(path, split)).to_pydict()
    np.testing.assert_array_equal(t["sample_id"], np.arange(len(t["label"])))
    return np.frombuffer(b"".join(t["image"]), np.uint8).reshape(-1, *shape), np.asarray(t["label"])


def cfg_for(tmp_path, folder, **kw) -> DataConfig:
    return DataConfig(**{"name": "idx", "root": str(tmp_path / "root"), "source": str(folder), **kw})


# --------------------------------------------------------------------------- the IDX header


def test_idx_header_parsing_dtypes_and_errors(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 7
    got = parse_idx(idx_bytes(a.astype(">i2")))
    assert got.dtype == np.int16 and got.shape == (2, 3, 4) and (got == a).all()
    f = np.linspace(-1, 1, 6).reshape(6).astype(">f8")
    np.testing.assert_array_equal(parse_idx(idx_bytes(f)), f)
    p = tmp_path / "x-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.array([3, 1, 4], np.uint8))))
    assert read_idx(p).tolist() == [3, 1, 4]  # gzip told by its first bytes

    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    for bad, fragment in ((b"\x08\x03" + good[2:], "magic number 0x08030803 is not an IDX header"),
                          (b"\x00\x00\x07\x03" + good[4:], "0x00000703 is not an IDX header"),
                          (good[:-5], "1563 data bytes after the IDX header; its dimensions [2, 28, 28] of uint8 "
                                      "need 1568"),
                          (good[:9], "announces 3 dimensions but the file ends after 9 bytes"),
                          (b"", "(empty)")):
        q = tmp_path / "bad"
        q.write_bytes(bad)
        with pytest.raises(DatasetError, match=str(q)) as e:
            read_idx(q)
        assert fragment in str(e.value) and "\n" not in str(e.value)
    for broken in (gzip.compress(good)[:30], b"\x1f\x8b" + good[2:]):
        q.write_bytes(broken)
        with pytest.raises(DatasetError, match=f"{q}: not a readable gzip file"):
            read_idx(q)


# --------------------------------------------------------------------------- prepare: size, channels, names


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_at_28_and_padded_to_32(tmp_path, gz):
    truth = write_idx_folder(tmp_path / "raw", np.random.default_rng(0), gz=gz)
    p28 = prepare_dataset(cfg_for(tmp_path, tmp_path / "raw", image_size=28), verbose=False)
    meta = load_meta(p28)
    assert meta["image_shape"] == [28, 28, 3] and meta["encoding"] == "raw" and meta["num_classes"] == 10
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["source_image_shape"] == [28, 28]
    for split in ("train", "test"):
        x, y = read_images(p28, split, (28, 28, 3))
        np.testing.assert_array_equal(y, truth[split][1])
        for c in range(3):  # grey replicated
            np.testing.assert_array_equal(x[..., c], truth[split][0])
    np.testing.assert_allclose(meta["mean"], [truth["train"][0].mean() / 255] * 3, atol=1e-6)
    np.testing.assert_allclose(meta["std"], [(truth["train"][0] / 255.0).std()] * 3, atol=1e-6)

    p32 = prepare_dataset(cfg_for(tmp_path, tmp_path / "raw", image_size=32), verbose=False)
    assert p32 != p28 and load_meta(p32)["image_shape"] == [32, 32, 3]
    x, _ = read_images(p32, "train", (32, 32, 3))
    np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], truth["train"][0])  # centred, 2 px of zeros a side
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (x[:, border] == 0).all()


def test_fit_size_resizes_other_sizes():
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    for size in (16, 56):
        got = fit_size(images, size)
        ref = TF.resize(torch.from_numpy(images)[:, None], [size, size], antialias=True)[:, 0].numpy()
        assert got.shape == (5, size, size) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # torchvision's uint8 resize, up to rounding
    flat = np.full((2, 28, 28), 77, np.uint8)
    assert (fit_size(flat, 20) == 77).all() and (fit_size(flat, 40) == 77).all()  # a resize, not a pad
    assert fit_size(images, 30)[:, 1:29, 1:29].tolist() == images.tolist()  # 30 <= 28 + 4: padded


def test_one_channel_through_the_transforms(tmp_path):
    truth = write_idx_folder(tmp_path / "raw", np.random.default_rng(2))
    cfg = cfg_for(tmp_path, tmp_path / "raw", image_size=32, channels=1)
    path = prepare_dataset(cfg, verbose=False)
    assert path.name.endswith(f"-32-c1-{path.name.split('-')[-1]}") and path != dataset_dir(
        dataclasses.replace(cfg, channels=3))
    meta = T.read_meta(path)
    assert meta["image_shape"] == [32, 32, 1] and len(meta["mean"]) == len(meta["std"]) == 1
    batch = next(iter_split(path, "train", batch_size=8))
    x = T.decode_images(batch.column("image").to_pylist(), meta)
    assert x.shape == (8, 32, 32, 1)
    np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], truth["train"][0][:8])
    ev = T.eval_transform(x, meta)
    assert ev.shape == (8, 1, 32, 32)
    torch.testing.assert_close(ev[:, 0], (torch.from_numpy(x[..., 0]).float() / 255 - meta["mean"][0]) / meta["std"][0])
    g = torch.Generator().manual_seed(0)
    for kind in ("cifar", "imagenet", "none"):
        assert T.train_transform(x, meta, kind, g).shape == (8, 1, 32, 32)
    # the cifar crop+flip of 1 channel is the same as of the replicated 3-channel image's first channel
    u = T.sample_uniforms(np.arange(8), 3, key=[1])
    one = T.augment_uint8(x, "cifar", uniforms=u)
    three = T.augment_uint8(np.repeat(x, 3, axis=-1), "cifar", uniforms=u)
    np.testing.assert_array_equal(one[..., 0], three[..., 0])


def test_channels_one_is_refused_where_unsupported(tmp_path):
    write_idx_folder(tmp_path / "raw", np.random.default_rng(3))
    with pytest.raises(ConfigError, match=r"data.channels: 1 .*cifar10 images are colour .*digits, fashion_mnist, idx"):
        prepare_dataset(DataConfig(name="cifar10", root=str(tmp_path / "r"), channels=1), verbose=False)
    with pytest.raises(ConfigError, match="data.channels"):
        load_config(overrides=["data.channels=2"])
    # a 1-channel set and the zoo's 3-channel models: refused at build time, in one line naming the key
    from kcd_ray.engine import assemble_engine

    cfg = load_config(overrides=["data.name=idx", f"data.source={tmp_path / 'raw'}", f"data.root={tmp_path / 'root'}",
                                 "data.channels=1", "model=resnet8", "optim.epochs=1"])
    path = prepare_dataset(cfg.data, verbose=False)
    with pytest.raises(ConfigError, match=r"data.channels: the prepared images have 1 channel\(s\) .*'resnet8' "
                                          r"takes 3"):
        assemble_engine(cfg, torch.device("cpu"), kind="teacher", data_dir=str(path), run_dir=tmp_path / "run")


def test_prepare_read_a_batch_and_a_zoo_model_forward(tmp_path):
    """fashion_mnist (its class names) from a folder of gzipped files: prepare -> a training batch -> resnet8."""
    from kcd_ray.engine import assemble_engine

    write_idx_folder(tmp_path / "fm", np.random.default_rng(4), n_train=30, n_test=10)
    cfg = load_config(overrides=["data.name=fashion_mnist", f"data.source={tmp_path / 'fm'}",
                                 f"data.root={tmp_path / 'root'}", "model=resnet8", "optim.epochs=1"])
    path = prepare_dataset(cfg.data, verbose=False)
    meta = T.read_meta(path)
    assert path.name.startswith("fashion_mnist-32-c3-") and meta["class_names"] == FASHION_MNIST_CLASSES
    assert T.resolve_augment(cfg.data.augment, meta) == "cifar"
    batch = next(iter_split(path, "train", batch_size=16))
    x = T.train_transform(batch.column("image").to_pylist(), meta, "cifar", torch.Generator().manual_seed(0))
    parts = assemble_engine(cfg, torch.device("cpu"), kind="teacher", data_dir=str(path),
                            run_dir=tmp_path / "run").parts
    out = parts.distiller({"image": x, "label": torch.as_tensor(batch.column("label").to_numpy())}, 4.0, 0)
    assert out.logits.shape == (16, 10) and torch.isfinite(out.losses["ce"])


def test_missing_folder_or_file_names_the_package_and_the_key(tmp_path):
    for name in ("fashion_mnist", "idx"):
        cfg = DataConfig(name=name, root=str(tmp_path / "root"), source=str(tmp_path / "nowhere"))
        with pytest.raises(DatasetError) as e:
            prepare_dataset(cfg, verbose=False)
        msg = str(e.value)
        assert msg.startswith("data.source: ") and str(tmp_path / "nowhere") in msg and "\n" not in msg
        assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte" in msg
    with pytest.raises(DatasetError, match="data.source: empty; .*apt-get install dataset-fashion-mnist"):
        prepare_dataset(DataConfig(name="idx", root=str(tmp_path / "root")), verbose=False)
    assert DataConfig(name="fashion_mnist").source == "" and FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"
    write_idx_folder(tmp_path / "part", np.random.default_rng(5), gz=False)
    (tmp_path / "part" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"data.source: .*part has no t10k-labels-idx1-ubyte or "
                                           r"t10k-labels-idx1-ubyte.gz \(.*apt-get install dataset-fashion-mnist"):
        prepare_dataset(cfg_for(tmp_path, tmp_path / "part"), verbose=False)
    assert not [p for p in (tmp_path / "root").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist_labels():
    for split, n in (("train", 60000), ("t10k", 10000)):
        y = read_idx(Path(FASHION_MNIST_DIR) / f"{split}-labels-idx1-ubyte.gz")
        assert y.shape == (n,) and (np.bincount(y) == n // 10).all()


# --------------------------------------------------------------------------- data.train_subset


def test_stratified_subset_rule():
    labels = np.repeat([0, 1, 2, 3], [50, 30, 15, 5])
    idx = stratified_subset(labels, 20, seed=0)
    assert len(idx) == 20 and (np.diff(idx) > 0).all()
    assert np.bincount(labels[idx]).tolist() == [10, 6, 3, 1]  # n * n_c / N
    odd = stratified_subset(labels, 7, seed=0)  # quotas 3.5, 2.1, 1.05, 0.35: remainders go to 0 then 3
    assert np.bincount(labels[odd], minlength=4).tolist() == [4, 2, 1, 0]
    assert (stratified_subset(labels, 20, seed=0) == idx).all()  # deterministic
    assert not (stratified_subset(labels, 20, seed=1) == idx).all()  # seeded
    assert set(idx) <= set(stratified_subset(labels, 40, seed=0))  # the same per-class order, nested here
    for n in (0, 100, 101):
        with pytest.raises(ConfigError, match="data.train_subset"):
            stratified_subset(labels, n, 0)


def test_train_subset_is_stratified_deterministic_and_keyed(tmp_path):
    truth = write_idx_folder(tmp_path / "raw", np.random.default_rng(6), n_train=60, n_test=12, classes=6)
    full_cfg = cfg_for(tmp_path, tmp_path / "raw", image_size=28)
    full = prepare_dataset(full_cfg, verbose=False)
    cfg = dataclasses.replace(full_cfg, train_subset=24, train_subset_seed=3)
    sub = prepare_dataset(cfg, verbose=False)
    assert sub == dataset_dir(cfg) and sub.name == f"{full.name}-sub24-s3"
    meta = load_meta(sub)
    assert meta["splits"]["train"]["num_rows"] == 24 and meta["splits"]["test"] == load_meta(full)["splits"]["test"]
    assert meta["train_subset"] == {"size": 24, "seed": 3, "of": 60, "per_class": {str(c): 4 for c in range(6)}}
    assert meta["mean"] == load_meta(full)["mean"]  # the full split's statistics
    x, y = read_images(sub, "train", (28, 28, 3))
    keep = stratified_subset(truth["train"][1], 24, 3)
    np.testing.assert_array_equal(x[..., 0], truth["train"][0][keep])  # the chosen rows, in their order
    np.testing.assert_array_equal(y, truth["train"][1][keep])
    again = prepare_dataset(dataclasses.replace(cfg, root=str(tmp_path / "other")), verbose=False)
    assert load_meta(again)["splits"] == meta["splits"]  # deterministic
    other = prepare_dataset(dataclasses.replace(cfg, train_subset_seed=4), verbose=False)
    assert other.name.endswith("-sub24-s4") and load_meta(other)["splits"]["train"] != meta["splits"]["train"]
    with pytest.raises(ConfigError, match="data.train_subset: 60 rows of a training split of 60"):
        prepare_dataset(dataclasses.replace(cfg, train_subset=60), verbose=False)


def test_train_subset_is_generic_across_sources(tmp_path):
    """An image folder (encoded rows with a source_path column) and the digits set take the same subset rule."""
    from test_data_sources import make_image_folder

    make_image_folder(tmp_path / "pets", np.random.default_rng(7))
    cfg = DataConfig(name="folder", root=str(tmp_path / "root"), source=str(tmp_path / "pets"), image_size=16)
    full = prepare_dataset(cfg, verbose=False)
    sub = prepare_dataset(dataclasses.replace(cfg, train_subset=6), verbose=False)
    ft = pq.read_table(split_files(full, "train")).to_pydict()
    st = pq.read_table(split_files(sub, "train")).to_pydict()
    keep = stratified_subset(ft["label"], 6, 0)
    assert st["source_path"] == [ft["source_path"][i] for i in keep] and st["image"] == [ft["image"][i] for i in keep]
    assert np.bincount(st["label"]).tolist() == [2, 2, 2] and st["sample_id"] == list(range(6))
    digits = prepare_dataset(DataConfig(name="digits", root=str(tmp_path / "root"), image_size=8, train_subset=100),
                             verbose=False)
    counts = np.bincount(pq.read_table(split_files(digits, "train"), columns=["label"])["label"].to_numpy())
    assert counts.sum() == 100 and counts.min() >= 9 and counts.max() <= 11
