"""A seeded synthetic image classification set with controllable redundancy (data.synthetic.*).

Each class owns a smooth texture: a sum of a few low-frequency 2-D sinusoids with class-specific
frequencies, phases and colours. A "hard" sample is its class texture at a random cyclic shift
and contrast, overlaid with a weaker texture of another class, plus pixel noise. Because of
the shifts and overlays a pixel template (linear) classifier does poorly while a small CNN,
which can pick up the local frequency/orientation content, learns it.

With ``duplicate_fraction > 0`` that share of the TRAIN set is near-copies (tiny noise) of a
few easy prototypes per class: redundancy that KCD should learn to drop. Those rows carry
``is_duplicate = 1`` in an extra int8 column (readers ignore unknown columns). The test set
has no duplicates and, for a given seed, classes, size and noise, does not depend on
num_train or duplicate_fraction, so runs that vary those are scored on the same images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from kcd_ray.data.parquet_io import SplitWriter
from kcd_ray.data.sources.base import DATASETS, ChannelStats, Source, log, short_hash

GENERATOR_VERSION = 1  # bump when the generator changes, so cached folders are not reused
WAVES_PER_CLASS = 3
MAX_FREQ = 3           # cycles per image: smooth patterns
PROTOTYPES_PER_CLASS = 2
DUPLICATE_NOISE = 0.02  # "tiny" noise of duplicates, in pattern-contrast units
PIXEL_SCALE = 40.0      # uint8 = 128 + PIXEL_SCALE * x, x roughly unit variance
CHUNK = 2048


def _params(cfg) -> dict:
    p = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return {k: p[k] for k in ("num_train", "num_test", "num_classes", "image_size",
                              "duplicate_fraction", "noise", "seed")}


def class_patterns(num_classes: int, size: int, seed: int) -> np.ndarray:
    """float32 [C, S, S, 3]: one smooth, unit-variance, cyclic texture per class."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    out = np.zeros((num_classes, size, size, 3), dtype=np.float64)
    for c in range(num_classes):
        for _ in range(WAVES_PER_CLASS):
            fx, fy = 0, 0
            while fx == 0 and fy == 0:  # integer frequencies keep cyclic shifts exact
                fx, fy = rng.integers(-MAX_FREQ, MAX_FREQ + 1, size=2)
            wave = np.sin(2 * np.pi * (fx * xx + fy * yy) / size + rng.uniform(0, 2 * np.pi))
            out[c] += wave[..., None] * rng.normal(size=3)[None, None, :]
        out[c] = (out[c] - out[c].mean()) / (out[c].std() + 1e-8)
    return out.astype(np.float32)


def _shifted(patterns: np.ndarray, cls: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """patterns[cls[i]] rolled by (dy[i], dx[i]) for every i (vectorised gather)."""
    size = patterns.shape[1]
    r = (np.arange(size)[None, :] - dy[:, None]) % size  # [N, S]
    c = (np.arange(size)[None, :] - dx[:, None]) % size
    return patterns[cls[:, None, None], r[:, :, None], c[:, None, :]]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(128.0 + PIXEL_SCALE * x), 0, 255).astype(np.uint8)


def distractor_waves(n: int, size: int, rng) -> np.ndarray:
    """float32 [n, S, S, 3]: per-sample random low-frequency waves (in-band clutter), unit variance."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    f = rng.integers(-MAX_FREQ, MAX_FREQ + 1, size=(n, WAVES_PER_CLASS, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(n, WAVES_PER_CLASS))
    colour = rng.normal(size=(n, WAVES_PER_CLASS, 3))
    arg = (f[..., 0, None, None] * xx + f[..., 1, None, None] * yy) * (2 * np.pi / size) + phase[..., None, None]
    x = np.einsum("nkhw,nkc->nhwc", np.sin(arg), colour)
    x -= x.mean(axis=(1, 2, 3), keepdims=True)
    return (x / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-8)).astype(np.float32)


def hard_samples(patterns, labels, noise, rng) -> np.ndarray:
    """Class texture at a random shift and contrast + a weaker texture of another class + noise.

    The noise is white (per pixel, at half weight) plus random low-frequency waves: white noise
    alone averages out over the image, in-band clutter competes with the class signal itself.
    With mix up to 1 some samples are genuinely ambiguous, so a CNN plateaus below 100%
    (about 90% test accuracy for a 3-layer CNN at the default noise 0.35, ~80-85% at 0.7).
    """
    n, (num_classes, size) = len(labels), patterns.shape[:2]
    contrast = rng.uniform(0.5, 1.0, size=n).astype(np.float32)
    other = (labels + rng.integers(1, num_classes, size=n)) % num_classes
    mix = rng.uniform(0.0, 1.0, size=n).astype(np.float32)
    x = _shifted(patterns, labels, rng.integers(0, size, n), rng.integers(0, size, n))
    y = _shifted(patterns, other, rng.integers(0, size, n), rng.integers(0, size, n))
    eps = 0.5 * rng.normal(size=x.shape).astype(np.float32) + distractor_waves(n, size, rng)
    x = contrast[:, None, None, None] * (x + mix[:, None, None, None] * y + noise * eps)
    return _to_uint8(x)


def duplicate_samples(prototypes, labels, proto_idx, rng) -> np.ndarray:
    x = prototypes[labels, proto_idx]
    return _to_uint8(x + DUPLICATE_NOISE * rng.normal(size=x.shape).astype(np.float32))


def synthetic_split(params: dict, split: str):
    """Yield (images uint8 [n,S,S,3], labels int64 [n], is_duplicate int8 [n]) chunks of a split."""
    C, S, seed = params["num_classes"], params["image_size"], params["seed"]
    patterns = class_patterns(C, S, seed)
    if split == "train":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        n = params["num_train"]
        n_dup = int(round(params["duplicate_fraction"] * n))
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
        n, n_dup = params["num_test"], 0
    # Easy prototypes: the class texture at full contrast, a fixed shift each, no overlay.
    prng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    pc = np.repeat(np.arange(C), PROTOTYPES_PER_CLASS)
    prototypes = _shifted(patterns, pc, prng.integers(0, S, len(pc)), prng.integers(0, S, len(pc)))
    prototypes = prototypes.reshape(C, PROTOTYPES_PER_CLASS, S, S, 3)
    # Balanced labels within the hard and the duplicate parts, then one shuffled order.
    labels = np.concatenate([np.arange(n - n_dup) % C, np.arange(n_dup) % C]).astype(np.int64)
    is_dup = np.concatenate([np.zeros(n - n_dup, np.int8), np.ones(n_dup, np.int8)])
    order = rng.permutation(n)
    labels, is_dup = labels[order], is_dup[order]
    proto_idx = rng.integers(0, PROTOTYPES_PER_CLASS, size=n)
    for start in range(0, n, CHUNK):
        lab, dup = labels[start:start + CHUNK], is_dup[start:start + CHUNK]
        images = np.empty((len(lab), S, S, 3), dtype=np.uint8)
        hard = dup == 0
        images[hard] = hard_samples(patterns, lab[hard], params["noise"], rng)
        if (~hard).any():
            images[~hard] = duplicate_samples(prototypes, lab[~hard], proto_idx[start:start + CHUNK][~hard], rng)
        yield images, lab, dup


@DATASETS.register("synthetic")
class Synthetic(Source):
    name = "synthetic"

    @property
    def params(self) -> dict:
        return _params(self.cfg.synthetic)

    def key(self) -> str:
        return f"synthetic-{short_hash({'v': GENERATOR_VERSION, **self.params})}"

    def build(self, out_dir: Path, log: Callable[[str], None] = log) -> dict:
        p = self.params
        if p["num_classes"] < 2:
            raise ValueError(f"data.synthetic.num_classes: {p['num_classes']}; expected >= 2")
        stats = ChannelStats(3)
        splits = {}
        for split in ("train", "test"):
            with SplitWriter(out_dir / split, extra={"is_duplicate": pa.int8()}) as w:
                for images, labels, dup in synthetic_split(p, split):
                    if split == "train":
                        stats.update(images)
                    w.add(labels, images, extra={"is_duplicate": dup})
                splits[split] = w.close()
        mean, std = stats.result()
        s = p["image_size"]
        return {
            "source": f"synthetic generator v{GENERATOR_VERSION}",
            "num_classes": p["num_classes"],
            "class_names": [f"class_{i}" for i in range(p["num_classes"])],
            "image_shape": [s, s, 3],
            "encoding": "raw",
            "mean": mean,
            "std": std,
            "splits": splits,
            "synthetic": {**p, "generator_version": GENERATOR_VERSION},
            "extra_columns": ["is_duplicate"],
        }
