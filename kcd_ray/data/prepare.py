"""Turn the configured source into a prepared Parquet folder: atomic, idempotent, shared by workers.

``prepare_dataset(data_cfg)`` returns ``<root>/<key>``. An existing folder is verified
(``verify.verify_prepared``) and returned untouched when intact; a damaged one is never
rebuilt silently: the call fails with one line naming the damaged file and asking for
``--force`` (``force=True``), which rebuilds it. A missing folder is converted from the source
into a temporary sibling folder, fully verified, and renamed into place at the end, so an
interrupted prepare leaves no half-written ``<key>`` behind, and two processes preparing the
same key at once both end up with one complete folder.

A root in an object store (``data.root=s3://bucket/data``, :mod:`kcd_ray.storage`): the data set is built in a
local working copy (``storage.stage_dir``), verified, and uploaded with ``meta.json`` last, so a data set in the
store is complete exactly when its ``meta.json`` is there. Every node that needs it fetches it once into its own
working copy (:func:`fetch_prepared`, verified in full after the download); the Ray Data read tasks read the
Parquet files from the store itself (``storage.parquet_source``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

from kcd_ray import storage
from kcd_ray.config import ConfigError
from kcd_ray.data.parquet_io import FORMAT_VERSION, META_FILE, DatasetError, load_meta, splits_of, write_meta
from kcd_ray.data.verify import FILES_KEY, check_prepared, file_records, verify_prepared
from kcd_ray.data.sources import DATASETS, Source
from kcd_ray.data.sources.base import log
from kcd_ray.data.subset import write_train_subset, write_val_split

TMP_PREFIX = ".tmp-"


def get_source(data_cfg) -> Source:
    try:
        cls = DATASETS.get(data_cfg.name)
    except KeyError as e:
        raise DatasetError(f"data.name: {e.args[0]}") from None
    channels = int(getattr(data_cfg, "channels", 0))
    if channels == 1 and not cls.grayscale:
        grey = ", ".join(n for n in DATASETS.names() if DATASETS.get(n).grayscale)
        raise ConfigError(f"data.channels: 1 keeps grey images at one channel; {data_cfg.name} images are colour "
                          f"(grey sources: {grey}); use data.channels=0 or 3")
    return cls(data_cfg)


def prepared_key(data_cfg, src: Optional[Source] = None) -> str:
    """The prepared folder's name: the source's key, plus ``-sub<n>-s<seed>`` for a ``data.train_subset`` and
    ``-val<fraction>-s<seed>`` for a ``data.val_fraction`` (a changed split is a new folder, never a silent change)."""
    key = (src or get_source(data_cfg)).key()
    n = int(getattr(data_cfg, "train_subset", 0) or 0)
    if n:
        key += f"-sub{n}-s{int(data_cfg.train_subset_seed)}"
    v = float(getattr(data_cfg, "val_fraction", 0.0) or 0.0)
    if v:
        key += f"-val{v:g}-s{int(data_cfg.val_seed)}"
    return key


def dataset_dir(data_cfg) -> Path:
    """``<root>/<key>`` of the configured data set (whether or not it is prepared yet)."""
    src = get_source(data_cfg)
    return src.root / prepared_key(data_cfg, src)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _clean_stale(root: Path, key: str) -> None:
    """Remove temp folders of this key left by killed prepares on this host."""
    host = _host()
    for d in root.glob(f"{TMP_PREFIX}{key}.*"):
        parts = d.name[len(TMP_PREFIX) + len(key) + 1:].split(".")
        if len(parts) >= 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            shutil.rmtree(d, ignore_errors=True)


def prepare_dataset(data_cfg, force: bool = False, verbose: bool = True, full_check: Optional[bool] = None) -> Path:
    """Prepare the configured data set (if needed) and return its folder ``<root>/<key>``.

    An existing folder is checked with ``verify_prepared(folder, full=full_check)`` first: by default
    (None) footers and row counts, plus the full content check when its files' sizes/mtimes changed
    since preparation; ``True`` (``kcd-ray prepare-data``) always reads and checks every byte. A
    damaged folder raises ``DatasetDamagedError`` naming the file; ``force=True`` rebuilds it (and
    any existing folder) from the source.
    """
    if storage.is_uri(data_cfg.root):
        return _prepare_in_store(data_cfg, force, verbose, full_check)
    src = get_source(data_cfg)
    key = prepared_key(data_cfg, src)
    root = src.root
    target = root / key
    if target.exists() and not force:
        verify_prepared(target, full=full_check)
        return target
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, key)
    tmp = root / f"{TMP_PREFIX}{key}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    say = log if verbose else (lambda msg: None)
    say(f"preparing {data_cfg.name} -> {target}")
    t0 = time.time()
    try:
        fields = src.build(tmp, say)
        if getattr(data_cfg, "train_subset", 0):
            sub = write_train_subset(tmp, data_cfg.train_subset, data_cfg.train_subset_seed)
            fields = {**fields, "splits": {**fields["splits"], "train": sub["train"]},
                      "train_subset": sub["train_subset"]}
            say(f"{data_cfg.name}: train subset of {sub['train_subset']['size']} of {sub['train_subset']['of']} "
                f"rows (stratified, seed {sub['train_subset']['seed']})")
        if getattr(data_cfg, "val_fraction", 0.0):
            val = write_val_split(tmp, data_cfg.val_fraction, data_cfg.val_seed)
            fields = {**fields, "splits": {**fields["splits"], **val["splits"]}, "val_split": val["val_split"]}
            say(f"{data_cfg.name}: validation split of {val['val_split']['size']} of {val['val_split']['of']} "
                f"training rows (stratified, seed {val['val_split']['seed']})")
        meta = {"format_version": FORMAT_VERSION, "name": src.name, "key": key, **fields}
        meta[FILES_KEY] = file_records(tmp)
        write_meta(tmp, meta)
        # reads everything back: catches a source (or disk) that wrote something inconsistent
        verify_prepared(tmp, full=True)
        _install(tmp, target, replace=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"prepared {target} in {time.time() - t0:.1f}s: "
        + ", ".join(f"{s} {meta['splits'][s]['num_rows']} rows" for s in splits_of(meta)))
    return target


def _prepare_in_store(data_cfg, force: bool, verbose: bool, full_check: Optional[bool]) -> Path:
    """``prepare_dataset`` for a root in an object store; returns this node's verified working copy."""
    storage.check(data_cfg.root, "data.root")
    uri = storage.join(data_cfg.root, prepared_key(data_cfg))
    if not force and storage.exists(storage.join(uri, META_FILE)):
        return fetch_prepared(uri, verbose=verbose, full_check=full_check)
    stage = storage.stage_dir(uri)
    path = prepare_dataset(dataclasses.replace(data_cfg, root=str(stage.parent)), force=force, verbose=verbose,
                           full_check=full_check)
    files = [f for f in storage.list_files(path) if f == META_FILE or f.startswith(("train/", "test/", "val/"))]
    (log if verbose else (lambda msg: None))(f"uploading {len(files)} files -> {uri}")
    storage.upload_tree(path, uri, files, last=[META_FILE])  # meta.json last: its presence means complete
    storage.mark_staged(path, uri, storage.sha256(storage.read_bytes(storage.join(uri, META_FILE))))
    return path


def fetch_prepared(uri: str, verbose: bool = True, full_check: Optional[bool] = None) -> Path:
    """This node's working copy of the prepared data set at ``uri``: reused while the store's meta.json is the one
    it was fetched with, else downloaded next to it, verified in full and renamed into place."""
    stage = storage.stage_dir(uri)
    try:
        digest = storage.sha256(storage.read_bytes(storage.join(uri, META_FILE)))
    except FileNotFoundError:
        raise DatasetError(f"{uri}: no prepared data set there (no {META_FILE}); run `kcd-ray prepare-data` "
                           "with this data.root first") from None
    if storage.staged_from(stage, digest=True) == (uri, digest):
        verify_prepared(stage, full=full_check)
        return stage
    stage.parent.mkdir(parents=True, exist_ok=True)
    tmp = stage.parent / f"{TMP_PREFIX}{stage.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    (log if verbose else (lambda msg: None))(f"fetching {uri} -> {stage}")
    try:
        for rel in storage.list_files(uri):
            if rel == META_FILE or rel.startswith(("train/", "test/")):
                storage.download(storage.join(uri, rel), tmp / rel)
        verify_prepared(tmp, full=True)  # every byte against meta.json's checksums
        storage.mark_staged(tmp, uri, digest)
        _install(tmp, stage, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stage


def _complete(path: Path) -> bool:
    try:
        check_prepared(path)
        return True
    except DatasetError:
        return False


def _install(tmp: Path, target: Path, replace: bool) -> None:
    """Rename the finished temp folder into place.

    A complete folder that appeared meanwhile (another process preparing the same key) is kept
    unless ``replace``; an incomplete one is moved aside first and deleted afterwards.
    """
    old = None
    if target.exists():
        if not replace and _complete(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.with_name(f"{TMP_PREFIX}{target.name}.old.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(tmp, target)
    except OSError as e:
        if not _complete(target):  # lost a race to another complete folder: keep theirs
            raise DatasetError(f"{target}: could not move the prepared folder {tmp} into place ({e})") from e
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


SHOW_SKIPPED = 20


def describe(data_dir: Path) -> list[str]:
    """One line per split: rows, classes, image shape, encoding, path; then the source files that
    were left out when preparing (unreadable or undecodable images), one per line."""
    meta = load_meta(data_dir)
    h, w, c = meta["image_shape"]
    lines = [f"{meta['name']} {s}: {meta['splits'][s]['num_rows']} rows, {meta['num_classes']} classes, "
             f"image {h}x{w}x{c} ({meta['encoding']}) -> {Path(data_dir) / s}" for s in splits_of(meta)]
    skipped = meta.get("skipped_files")
    for s in ("train", "test"):
        bad = skipped.get(s) if isinstance(skipped, dict) else None
        if not isinstance(bad, dict) or not bad:  # older meta.json: counts only
            continue
        lines.append(f"{meta['name']} {s}: skipped {len(bad)} unreadable source file(s)"
                     + (f" (all listed in {Path(data_dir) / 'meta.json'} under skipped_files):"
                        if len(bad) > SHOW_SKIPPED else ":"))
        lines += [f"  {p}: {why}" for p, why in list(bad.items())[:SHOW_SKIPPED]]
        if len(bad) > SHOW_SKIPPED:
            lines.append(f"  ... {len(bad) - SHOW_SKIPPED} more")
    return lines


def main_prepare(cfg, force: bool = False) -> Path:
    """`kcd-ray prepare-data`: prepare cfg.data (an existing copy is fully verified: every byte
    against meta.json's checksums) and print a summary line per split plus any skipped files."""
    path = prepare_dataset(cfg.data, force=force, full_check=True)
    for line in describe(path):
        print(line, flush=True)
    return path
