"""An ImageNet-style image folder, kept encoded (PNG/JPEG file bytes) in Parquet.

Layout: ``<source>/train/<class>/**/*.{jpg,jpeg,png}`` and ``<source>/val/`` (or ``test/``) alike.
Classes are the sorted sub-folder names of ``train/``. Every file is decoded once at prepare
time with the run-time decoder (torchvision's, in a thread pool: it releases the GIL), so a
truncated or corrupt PNG/JPEG is left out at prepare time instead of failing a run: skipped files
are listed in a warning and, with the reason, in meta.json under ``skipped_files``
(``{split: {path: reason}}``). Each row keeps its original file in an extra ``source_path``
column (relative to meta's ``source``; readers ignore it, error messages name it). The pipeline
decodes to ``image_shape`` = [S, S, 3], S = data.image_size.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from kcd_ray.data.parquet_io import DatasetError, SplitWriter
from kcd_ray.data.sources.base import DATASETS, IMAGENET_MEAN, IMAGENET_STD, Source, log, short_hash

EXTENSIONS = (".jpg", ".jpeg", ".png")
TEST_DIRS = ("val", "test")
ORDER_SEED = 0       # train rows are stored in a fixed shuffled order (see _ordered)
WRITE_BATCH = 256
PROGRESS_EVERY = 5000
SHOW_SKIPPED = 5
MAX_DECODE_THREADS = 16


class SkippedFilesWarning(UserWarning):
    """Some image files could not be read and were left out."""


def image_problem(data: bytes) -> Optional[str]:
    """None when ``data`` is a PNG/JPEG file the run-time decoder reads, else why not (one line).

    Decodes the whole image with torchvision's ``decode_image`` (RGB), as ``transforms.decode_images``
    does at run time, so a truncated or corrupt file is caught here and not in epoch 1.
    """
    if not data:
        return "empty file"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        fmt = "PNG"
    elif data.startswith(b"\xff\xd8\xff"):
        fmt = "JPEG"
    else:
        return "not a PNG/JPEG file"
    import torch
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError with "<op>, <file.cpp>:<line>, <reason>"
        why = " ".join(str(e).split()).split(".cpp:")[-1].split(", ", 1)[-1] or type(e).__name__
        return f"{fmt} does not decode ({why})"
    if img.ndim != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        return f"{fmt} decodes to an empty image {tuple(img.shape)}"
    return None


def _image_format(data: bytes) -> Optional[str]:
    """'PNG' / 'JPEG' when the bytes are a fully decodable file of that kind, else None."""
    if image_problem(data) is not None:
        return None
    return "PNG" if data.startswith(b"\x89PNG") else "JPEG"


def _read_checked(path: Path) -> tuple[Optional[bytes], Optional[str]]:
    """(file bytes, None) for a good image, (None, reason) otherwise."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    why = image_problem(data)
    return (None, why) if why else (data, None)


def _decode_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(MAX_DECODE_THREADS, n))


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
            "extra_columns": ["source_path"],
            "skipped_files": skipped_all,
        }

    def _write(self, split_dir: Path, items: list, split: str, source: Path, log) -> tuple[dict, dict]:
        """Write one split; returns (meta's split info, {skipped path: reason})."""
        skipped: dict[str, str] = {}
        total = len(items)
        root = self.source_dir
        done = 0
        with SplitWriter(split_dir, extra={"source_path": pa.string()}) as w, \
                ThreadPoolExecutor(_decode_threads(), thread_name_prefix="kcd-decode-check") as pool:
            for start in range(0, total, WRITE_BATCH):
                chunk = items[start:start + WRITE_BATCH]
                labels, blobs, rels = [], [], []
                for (path, label), (data, why) in zip(chunk, pool.map(_read_checked, [p for p, _ in chunk])):
                    if why is not None:
                        skipped[str(path)] = why
                    else:
                        labels.append(label)
                        blobs.append(data)
                        # undecodable bytes of a file name (surrogates) become \x.. escapes in the UTF-8 column
                        rels.append(os.fsencode(os.path.relpath(path, root)).decode("utf-8", "backslashreplace"))
                if blobs:
                    w.add(labels, blobs, extra={"source_path": rels})
                if (done + len(chunk)) // PROGRESS_EVERY > done // PROGRESS_EVERY:
                    log(f"folder: {split} {done + len(chunk)}/{total} files")
                done += len(chunk)
            info = w.close()
        skipped = dict(sorted(skipped.items()))
        if skipped:
            shown = ", ".join(f"{p} ({why})" for p, why in list(skipped.items())[:SHOW_SKIPPED])
            more = f" and {len(skipped) - SHOW_SKIPPED} more" if len(skipped) > SHOW_SKIPPED else ""
            warnings.warn(f"{split}: skipped {len(skipped)} unreadable image file(s) of {total} (left out of the "
                          f"prepared set; all listed in its meta.json under skipped_files): {shown}{more}",
                          SkippedFilesWarning, stacklevel=2)
        if info["num_rows"] == 0:
            first = next(iter(skipped.items()), None)
            raise DatasetError(f"{source}: no readable images among {total} files "
                               f"(first: {f'{first[0]} ({first[1]})' if first else '-'})")
        log(f"folder: {split} {info['num_rows']} images ({len(skipped)} skipped"
            + (f": {', '.join(list(skipped)[:SHOW_SKIPPED])}{' ...' if len(skipped) > SHOW_SKIPPED else ''})"
               if skipped else ")"))
        return info, skipped
