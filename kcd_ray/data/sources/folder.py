"""An ImageNet-style image folder, kept encoded (PNG/JPEG file bytes) in Parquet.

Layout: ``<source>/train/<class>/**/*.{jpg,jpeg,png}`` and ``<source>/val/`` (or ``test/``) alike.
Classes are the sorted sub-folder names of ``train/``. Nothing is decoded at prepare time: each
file gets a cheap header check (magic bytes + PIL's header parse); files that fail are skipped
with a warning that lists them. The pipeline decodes to ``image_shape`` = [S, S, 3],
S = data.image_size.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from kcd_ray.data.parquet_io import DatasetError, SplitWriter
from kcd_ray.data.sources.base import DATASETS, IMAGENET_MEAN, IMAGENET_STD, Source, log, short_hash

EXTENSIONS = (".jpg", ".jpeg", ".png")
TEST_DIRS = ("val", "test")
ORDER_SEED = 0       # train rows are stored in a fixed shuffled order (see _ordered)
WRITE_BATCH = 256
PROGRESS_EVERY = 5000
SHOW_SKIPPED = 5


class SkippedFilesWarning(UserWarning):
    """Some image files could not be read and were left out."""


def _image_format(data: bytes) -> str | None:
    """'PNG' / 'JPEG' when the bytes start like one and PIL can parse the header, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        fmt = "PNG"
    elif data.startswith(b"\xff\xd8\xff"):
        fmt = "JPEG"
    else:
        return None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # parses the header only, no pixel decode
            if im.width < 1 or im.height < 1:
                return None
    except Exception:
        return None
    return fmt


def list_images(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(path, label)]) of one split folder; errors name empty folders."""
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: folder not found")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DatasetError(f"{split_dir}: no class sub-folders; expected {split_dir}/<class>/*.jpg|jpeg|png")
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DatasetError(f"{split_dir}: classes {unknown[:5]} are not in the train folder")
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[Path, int]] = []
    for c in found:
        files = []
        for dirpath, dirnames, filenames in os.walk(split_dir / c, followlinks=True):
            dirnames.sort()
            files += [Path(dirpath) / f for f in sorted(filenames)
                      if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
        if not files:
            raise DatasetError(f"{split_dir / c}: class folder holds no .jpg/.jpeg/.png images")
        items += [(f, index[c]) for f in files]
    return classes, items


def _ordered(items: list, split: str) -> list:
    """Train rows in a fixed shuffled order, so nearby sample ids (and Parquet parts) mix classes."""
    if split != "train":
        return items
    perm = np.random.default_rng(ORDER_SEED).permutation(len(items))
    return [items[i] for i in perm]


@DATASETS.register("folder")
class ImageFolder(Source):
    name = "folder"

    @property
    def source_dir(self) -> Path:
        if not self.cfg.source:
            raise DatasetError("data.source: empty; set it to an image folder holding train/ and val/ or test/")
        return Path(self.cfg.source).expanduser().resolve()

    def key(self) -> str:
        d = self.source_dir
        # the path hash keeps two folders with the same base name apart
        return f"folder-{d.name}-{int(self.cfg.image_size)}-{short_hash(str(d))[:6]}"

    def _test_dir(self) -> Path:
        for name in TEST_DIRS:
            if (self.source_dir / name).is_dir():
                return self.source_dir / name
        raise DatasetError(f"{self.source_dir}: no val/ or test/ folder; expected "
                           f"{self.source_dir}/val/<class>/*.jpg (or test/)")

    def build(self, out_dir: Path, log: Callable[[str], None] = log) -> dict:
        src = self.source_dir
        if not src.is_dir():
            raise DatasetError(f"data.source: {src} is not a folder; expected train/ and val/ or test/ inside")
        classes, train_items = list_images(src / "train")
        test_dir = self._test_dir()
        _, test_items = list_images(test_dir, classes)
        splits, skipped_all = {}, {}
        for split, items in (("train", _ordered(train_items, "train")), ("test", test_items)):
            source = src / "train" if split == "train" else test_dir
            splits[split], skipped_all[split] = self._write(out_dir / split, items, split, source, log)
        s = int(self.cfg.image_size)
        return {
            "source": str(src),
            "num_classes": len(classes),
            "class_names": classes,
            "image_shape": [s, s, 3],
            "encoding": "encoded",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "splits": splits,
            "test_folder": test_dir.name,
            "skipped_files": {k: len(v) for k, v in skipped_all.items()},
        }

    def _write(self, split_dir: Path, items: list, split: str, source: Path, log) -> tuple[dict, list[str]]:
        skipped: list[str] = []
        total = len(items)
        labels, blobs = [], []
        with SplitWriter(split_dir) as w:
            for i, (path, label) in enumerate(items, 1):
                try:
                    data = path.read_bytes()
                except OSError:
                    data = b""
                if _image_format(data) is None:
                    skipped.append(str(path))
                else:
                    labels.append(label)
                    blobs.append(data)
                if len(blobs) >= WRITE_BATCH:
                    w.add(labels, blobs)
                    labels, blobs = [], []
                if i % PROGRESS_EVERY == 0:
                    log(f"folder: {split} {i}/{total} files")
            if blobs:
                w.add(labels, blobs)
            info = w.close()
        if skipped:
            skipped.sort()
            shown = ", ".join(skipped[:SHOW_SKIPPED]) + (" ..." if len(skipped) > SHOW_SKIPPED else "")
            warnings.warn(f"{split}: skipped {len(skipped)} unreadable image file(s) of {total}: {shown}",
                          SkippedFilesWarning, stacklevel=2)
        if info["num_rows"] == 0:
            raise DatasetError(f"{source}: no readable images among {total} files "
                               f"(first: {skipped[0] if skipped else '-'})")
        log(f"folder: {split} {info['num_rows']} images ({len(skipped)} skipped)")
        return info, skipped
