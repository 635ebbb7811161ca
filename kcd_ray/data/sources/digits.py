"""scikit-learn's bundled handwritten digits (1797 real 8x8 images, offline), made CIFAR-shaped.

8x8 grey levels 0..16 -> uint8 0..255, bilinear resize to data.image_size, replicated to 3
channels so the CIFAR networks run unchanged (``data.channels=1`` keeps one). A fixed stratified 75/25
split (seed 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from kcd_ray.data.parquet_io import SplitWriter
from kcd_ray.data.sources.base import DATASETS, ChannelStats, Source, log

TEST_FRACTION = 0.25
SPLIT_SEED = 0


def digits_arrays(image_size: int, channels: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"test": (uint8 [N, S, S, channels], int64 [N])} for the digits set at size S."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.float32)  # [N, 8, 8], 0..255
    if image_size != grey.shape[1]:
        t = F.interpolate(torch.from_numpy(grey)[:, None], size=(image_size, image_size),
                          mode="bilinear", align_corners=False)
        grey = t[:, 0].numpy()
    u8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    rgb = np.repeat(u8[..., None], channels, axis=-1)
    labels = d.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION,
                                           stratify=labels, random_state=SPLIT_SEED)
    return {"train": (rgb[idx_train], labels[idx_train]), "test": (rgb[idx_test], labels[idx_test])}


@DATASETS.register("digits")
class Digits(Source):
    name = "digits"
    grayscale = True

    def channels(self) -> int:
        return int(getattr(self.cfg, "channels", 0)) or 3

    def key(self) -> str:
        c = self.channels()
        return f"digits-{int(self.cfg.image_size)}" + ("" if c == 3 else f"-c{c}")

    def build(self, out_dir: Path, log: Callable[[str], None] = log) -> dict:
        s, c = int(self.cfg.image_size), self.channels()
        arrays = digits_arrays(s, c)
        stats = ChannelStats(c)
        stats.update(arrays["train"][0])
        mean, std = stats.result()
        splits = {}
        for split, (images, labels) in arrays.items():
            with SplitWriter(out_dir / split) as w:
                w.add(labels, images)
                splits[split] = w.close()
        return {
            "source": "sklearn.datasets.load_digits",
            "num_classes": 10,
            "class_names": [str(i) for i in range(10)],
            "image_shape": [s, s, c],
            "encoding": "raw",
            "mean": mean,
            "std": std,
            "splits": splits,
        }
