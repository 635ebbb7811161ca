"""MNIST-family IDX files (MNIST, Fashion-MNIST, KMNIST, ...): the four standard files of one folder, gzipped or not.

The IDX format (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a big-endian magic number of two zero bytes, a
dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64) and the number of dimensions;
one big-endian uint32 per dimension; then the values, big-endian, in C order. A file is read gzipped or not (told
apart by its first bytes, not its name).

``idx``: ``data.source`` names the folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each also as ``<name>.gz``); classes are the label ids.
``fashion_mnist``: the same with Fashion-MNIST's ten class names, ``data.source`` defaulting to the folder Debian's
``dataset-fashion-mnist`` package installs.

Images ([N, H, W] uint8) are brought to ``data.image_size`` S: kept at S = H, zero-padded around (centred) for
H < S <= H + 4 (28 -> 32, what CIFAR-style Fashion-MNIST recipes do for the CIFAR networks), bilinearly resized
(antialiased when shrinking) to any other size. Grey levels are replicated to 3 channels (``data.channels`` 0 or 3:
the model zoo takes 3) or kept as 1 channel (``data.channels=1``). ``mean``/``std``: of the whole training split.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from kcd_ray.data.parquet_io import DatasetError, SplitWriter
from kcd_ray.data.sources.base import DATASETS, ChannelStats, Source, log, short_hash

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MAX_PAD = 4  # sizes up to 4 px larger than the images are reached by zero padding, others by a resize
CHUNK = 8192  # images per resize / statistics / write step (bounds the float copies)
APT_HINT = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# The label ids' names, from github.com/zalandoresearch/fashion-mnist README.md ("Labels").
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


# --------------------------------------------------------------------------- reading IDX files


def parse_idx(data: bytes, path="<bytes>") -> np.ndarray:
    """The array of one IDX file's (uncompressed) bytes, in native byte order; errors name ``path``."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES or data[3] == 0:
        codes = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DatasetError(f"{path}: magic number 0x{data[:4].hex().upper() or '(empty)'} is not an IDX header; "
                           f"expected two zero bytes, a dtype code ({codes}) and the number of dimensions")
    ndim = data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise DatasetError(f"{path}: the IDX header announces {ndim} dimensions but the file ends after "
                           f"{len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:start])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - start != need:
        raise DatasetError(f"{path}: {len(data) - start} data bytes after the IDX header; its dimensions "
                           f"{list(dims)} of {dtype.name} need {need}")
    return np.frombuffer(data, dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file, gzipped (by its first two bytes, 1F 8B) or not."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream
            raise DatasetError(f"{path}: not a readable gzip file ({type(e).__name__}: {e})") from None
    return parse_idx(raw, path)


def split_arrays(folder: Path, split: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W], int64 labels [N]) of one split of an IDX folder."""
    files = [find_file(folder, stem, hint) for stem in SPLIT_FILES[split]]
    images, labels = (read_idx(f) for f in files)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(f"{files[0]}: {images.dtype} {list(images.shape)}; expected uint8 [N, H, W] images "
                           f"(idx3-ubyte)")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{files[1]}: {labels.dtype} {list(labels.shape)}; expected integer labels [N] (idx1)")
    if len(labels) != len(images):
        raise DatasetError(f"{files[1]}: {len(labels)} labels for the {len(images)} images of {files[0]}")
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"{files[1]}: negative label {int(labels.min())}")
    return images, labels.astype(np.int64)


def find_file(folder: Path, stem: str, hint: str) -> Path:
    """``<stem>`` or ``<stem>.gz`` in folder (also with the dotted ``train-images.idx3-ubyte`` spelling)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"data.source: {folder} has no {stem} or {stem}.gz ({hint})")


# --------------------------------------------------------------------------- size and channels


def fit_size(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W] -> [N, size, size]: unchanged, zero-padded (centred) when H, W < size <= H, W + MAX_PAD,
    else bilinearly resized (antialiased when shrinking)."""
    n, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if max(h, w) <= size <= min(h, w) + MAX_PAD:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((n, size, size), np.uint8)
        out[:, top:top + h, left:left + w] = images
        return out
    import torch
    import torch.nn.functional as F

    out = np.empty((n, size, size), np.uint8)
    for s in range(0, n, CHUNK):
        x = torch.from_numpy(images[s:s + CHUNK]).float()[:, None]
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(h, w))
        out[s:s + CHUNK] = y[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def with_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grey uint8 [N, S, S] -> [N, S, S, channels] (1: kept, 3: replicated)."""
    return np.repeat(images[..., None], channels, axis=-1) if channels != 1 else images[..., None]


def grey_stats(images: np.ndarray, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0..1) of grey images shown with ``channels`` equal channels, in chunks."""
    stats = ChannelStats(1)
    for s in range(0, len(images), CHUNK):
        stats.update(images[s:s + CHUNK, ..., None])
    mean, std = stats.result()
    return mean * channels, std * channels


# --------------------------------------------------------------------------- the sources


@DATASETS.register("idx")
class IdxFolder(Source):
    name = "idx"
    grayscale = True  # honours data.channels
    default_source = ""
    class_names: list[str] = []

    def folder(self) -> Path:
        src = self.cfg.source or self.default_source
        hint = (f"set data.source to a folder holding {', '.join(sum(SPLIT_FILES.values(), ()))} (each may be "
                f"gzipped), e.g. {FASHION_MNIST_DIR} from `{APT_HINT}`")
        if not src:
            raise DatasetError(f"data.source: empty; {hint}")
        folder = Path(src).expanduser().resolve()
        if not folder.is_dir():
            raise DatasetError(f"data.source: {folder} is not a folder; {hint}")
        return folder

    def channels(self) -> int:
        return int(self.cfg.channels) or 3

    def key(self) -> str:
        d = self.folder()
        stem = self.name if self.default_source else f"{self.name}-{d.name}"
        # the path hash keeps two folders with the same base name apart
        return f"{stem}-{int(self.cfg.image_size)}-c{self.channels()}-{short_hash(str(d))[:6]}"

    def build(self, out_dir: Path, log: Callable[[str], None] = log) -> dict:
        folder, s, c = self.folder(), int(self.cfg.image_size), self.channels()
        hint = f"data.source names the folder of the four IDX files; for Fashion-MNIST `{APT_HINT}`"
        arrays = {split: split_arrays(folder, split, hint) for split in SPLIT_FILES}
        num_classes = len(self.class_names) or int(max(int(y.max()) for _, y in arrays.values() if len(y))) + 1
        names = self.class_names or [str(i) for i in range(num_classes)]
        splits, mean, std = {}, None, None
        for split, (images, labels) in arrays.items():
            if len(labels) and labels.max() >= num_classes:
                raise DatasetError(f"{folder}: {split} label {int(labels.max())} outside 0..{num_classes - 1} "
                                   f"({self.name} has {num_classes} classes)")
            fitted = fit_size(images, s)
            if split == "train":
                mean, std = grey_stats(fitted, c)
            with SplitWriter(out_dir / split) as w:
                for i in range(0, len(labels), CHUNK):
                    w.add(labels[i:i + CHUNK], with_channels(fitted[i:i + CHUNK], c))
                splits[split] = w.close()
            log(f"{self.name}: {split} {len(labels)} images {images.shape[1]}x{images.shape[2]} -> {s}x{s}x{c} "
                f"from {folder}")
        return {"source": str(folder), "num_classes": num_classes, "class_names": names, "image_shape": [s, s, c],
                "encoding": "raw", "mean": mean, "std": std, "splits": splits,
                "source_image_shape": list(arrays["train"][0].shape[1:])}


@DATASETS.register("fashion_mnist")
class FashionMnist(IdxFolder):
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 60,000 + 10,000 28x28 grey images of ten clothing classes."""

    name = "fashion_mnist"
    default_source = FASHION_MNIST_DIR
    class_names = FASHION_MNIST_CLASSES
