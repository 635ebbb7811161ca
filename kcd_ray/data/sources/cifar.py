"""CIFAR-10 / CIFAR-100 from the standard python-pickle folders, stored raw (uint8 32x32x3 HWC).

Layouts (as distributed at https://www.cs.toronto.edu/~kriz/cifar.html):
``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` with keys ``data`` (N x 3072,
channel-planar R, G, B), ``labels``, and ``label_names`` in the meta file;
``cifar-100-python/{train, test, meta}`` with ``fine_labels`` and ``fine_label_names``.
The originals are Python 2 pickles whose keys load as bytes; both bytes and str keys are accepted.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from kcd_ray.data.parquet_io import DatasetError, SplitWriter
from kcd_ray.data.sources.base import DATASETS, Source, log


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")  # what torchvision uses for the py2 pickles
    except Exception as e:  # a truncated or foreign file: name it
        raise DatasetError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _get(d: dict, key: str, path: Path):
    if key not in d:
        raise DatasetError(f"{path}: key {key!r} missing; found {sorted(d)}")
    return d[key]


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class _Cifar(Source):
    folder = ""          # the folder name inside the archive
    train_files: tuple = ()
    test_files: tuple = ()
    meta_file = ""
    label_key = ""
    names_key = ""
    num_classes = 0
    mean: tuple = ()
    std: tuple = ()
    tv_class = ""        # torchvision.datasets class used when data.download is true

    # ------------------------------------------------------------------ locating the folder
    def expected_files(self) -> list[str]:
        return [*self.train_files, *self.test_files, self.meta_file]

    def _candidates(self) -> list[Path]:
        src = self.cfg.source
        base = Path(src).expanduser() if src else self.root / "raw"
        return [base, base / self.folder]

    def _has_all(self, d: Path) -> bool:
        return all((d / f).is_file() for f in self.expected_files())

    def locate(self) -> Path:
        """The pickle folder; downloads it first when missing and data.download is true."""
        for d in self._candidates():
            if self._has_all(d):
                return d
        if getattr(self.cfg, "download", False):
            return self._download()
        cands = self._candidates()
        looked = " and ".join(str(d) for d in cands)
        present = next((d for d in reversed(cands) if d.is_dir()), None)
        if present is None:
            detail = "neither folder exists"
        else:
            missing = [f for f in self.expected_files() if not (present / f).is_file()]
            detail = f"{present} lacks {', '.join(missing)}"
        raise DatasetError(
            f"{self.name}: no {self.folder} pickle folder found; looked in {looked} for "
            f"{', '.join(self.expected_files())} ({detail}). Set data.source to the {self.folder} "
            f"folder or its parent, or set data.download=true to fetch it")

    def _download(self) -> Path:
        cands = self._candidates()
        parent = cands[0].parent if cands[0].name == self.folder else cands[0]
        parent.mkdir(parents=True, exist_ok=True)
        log(f"{self.name}: downloading into {parent} with torchvision")
        try:
            import torchvision.datasets as tvd

            getattr(tvd, self.tv_class)(root=str(parent), train=True, download=True)
        except Exception as e:
            raise DatasetError(f"{self.name}: download into {parent} failed ({type(e).__name__}: {e}); "
                               f"place the {self.folder} folder there by hand and set data.source") from None
        d = parent / self.folder
        if not self._has_all(d):
            raise DatasetError(f"{self.name}: after download {d} still lacks some of "
                               f"{', '.join(self.expected_files())}")
        return d

    # ------------------------------------------------------------------ conversion
    def _read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        d = _load_pickle(path)
        data = np.asarray(_get(d, "data", path))
        labels = np.asarray(_get(d, self.label_key, path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{path}: 'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
        if len(labels) != len(data):
            raise DatasetError(f"{path}: {len(data)} images but {len(labels)} {self.label_key}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DatasetError(f"{path}: {self.label_key} outside 0..{self.num_classes - 1}")
        # channel-planar rows (R plane, G plane, B plane) -> HWC
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    def build(self, out_dir: Path, log: Callable[[str], None] = log) -> dict:
        folder = self.locate()
        meta_path = folder / self.meta_file
        class_names = _names(_get(_load_pickle(meta_path), self.names_key, meta_path))
        if len(class_names) != self.num_classes:
            raise DatasetError(f"{meta_path}: {len(class_names)} {self.names_key}; expected {self.num_classes}")
        splits = {}
        for split, files in (("train", self.train_files), ("test", self.test_files)):
            with SplitWriter(out_dir / split) as w:
                for fname in files:
                    images, labels = self._read_batch(folder / fname)
                    w.add(labels, images)
                splits[split] = w.close()
            log(f"{self.name}: {split} {splits[split]['num_rows']} images from {folder}")
        return {
            "source": str(folder),
            "num_classes": self.num_classes,
            "class_names": class_names,
            "image_shape": [32, 32, 3],
            "encoding": "raw",
            "mean": list(self.mean),
            "std": list(self.std),
            "splits": splits,
        }


@DATASETS.register("cifar10")
class Cifar10(_Cifar):
    name = "cifar10"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    tv_class = "CIFAR10"


@DATASETS.register("cifar100")
class Cifar100(_Cifar):
    name = "cifar100"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
    num_classes = 100
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
    tv_class = "CIFAR100"
