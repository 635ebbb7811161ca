"""What every data source provides, the DATASETS registry, and helpers shared by the sources."""

from __future__ import annotations

import abc
import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from kcd_ray.registry import Registry

# name (the config's data.name) -> Source subclass
DATASETS: Registry = Registry("dataset")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def log(msg: str) -> None:
    print(f"[kcd_ray.data] {msg}", flush=True)


class Source(abc.ABC):
    """A raw data source that converts itself into the Parquet format of ``parquet_io``.

    Subclasses set ``name`` and implement ``key()`` (the prepared folder's name: it must change
    whenever the written content would) and ``build(out_dir, log)``, which writes ``train/`` and
    ``test/`` with ``SplitWriter`` and returns the meta fields other than ``format_version``,
    ``name`` and ``key``: ``source``, ``num_classes``, ``class_names``, ``image_shape``,
    ``encoding``, ``mean``, ``std``, ``splits`` (and any extras). ``data.train_subset`` is applied by
    ``prepare`` to whatever ``build`` wrote (``kcd_ray.data.subset``), so sources need not know about it.
    """

    name = ""
    grayscale = False  # grey images: data.channels may keep them at 1 channel (else they are stored RGB)

    def __init__(self, data_cfg):
        self.cfg = data_cfg

    @property
    def root(self) -> Path:
        return Path(self.cfg.root).expanduser()

    def key(self) -> str:
        return self.name

    @abc.abstractmethod
    def build(self, out_dir: Path, log: Callable[[str], None] = log) -> dict:
        """Write the splits' Parquet files into out_dir and return the meta dict."""


def short_hash(obj) -> str:
    """Stable 8-hex-digit hash of a JSON-able object (used in folder keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


class ChannelStats:
    """Per-channel mean/std (0..1 scale) accumulated over uint8 NHWC batches."""

    def __init__(self, channels: int):
        self.n = 0
        self.s = np.zeros(channels, dtype=np.float64)
        self.sq = np.zeros(channels, dtype=np.float64)

    def update(self, images: np.ndarray) -> None:
        x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.sq += (x * x).sum(0)

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.s / max(self.n, 1)
        var = np.maximum(self.sq / max(self.n, 1) - mean * mean, 0.0)
        return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-6)), 6) for s in np.sqrt(var)]
