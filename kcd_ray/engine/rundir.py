"""The run folder: ``<storage_path>/<name>/`` holds Ray Train's checkpoints and kcd_ray's own files.

Layout: ``config.yaml``, ``metrics.jsonl`` (one JSON object per epoch), ``summary.json``,
``masks/mask_v<k>.parquet``, ``values/`` (E-step value tables) and ``blends/`` (the VAKS overlay).

``run.storage_path`` is a file-system path (local disk, or NFS/EFS shared by every node on a cluster) or an
object-store URI (``s3://bucket/prefix``, :mod:`kcd_ray.storage`). With a URI, ``RunDir.path`` is a local working
copy (``storage.stage_dir``) and ``RunDir.remote`` the run's URI: files are written locally as with a path, and
:meth:`RunDir.sync_up` uploads what changed since the last sync (and deletes what was removed) at the points
where they are complete; :meth:`RunDir.sync_down` fetches the run's files before a resume. Ray Train writes the
checkpoints (``checkpoint_*``) to the URI itself; they are never part of the working copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from kcd_ray import storage
from kcd_ray.storage import check_name

_PARTIAL = re.compile(r"\.tmp[0-9a-f-]*$|\.partial$")  # being written: never uploaded


def resolve_storage(storage_path: str) -> Path:
    """A file-system ``storage_path`` as an absolute path (what needs a folder: sweeps, ED's teacher paths)."""
    if storage.is_uri(storage_path):
        raise ValueError(
            f"run.storage_path: {storage_path!r} is a URI; this needs a file-system path (a local folder, or an "
            "NFS/EFS mount shared by all nodes)"
        )
    return storage.local_path(storage_path).resolve()


def run_folder(storage_path: str, name: str) -> "RunDir":
    """The run folder ``<storage_path>/<name>``: a local folder, or a working copy of an object-store URI."""
    check_name(name)  # '..', 'a/b', '/abs': never outside storage_path, local or URI
    if storage.is_uri(storage_path):
        uri = storage.join(storage_path, name)
        return RunDir(storage.stage_dir(uri), remote=uri)
    return RunDir(resolve_storage(storage_path) / name)


def ray_owned(rel: str) -> bool:
    """Files Ray Train writes into the run's URI itself (checkpoints, its markers): not in the working copy."""
    top = rel.split("/", 1)[0]
    return top.startswith(("checkpoint_", ".validate_storage_marker"))


# Ray Train checkpoint folders: ``checkpoint_epoch_<epoch>`` and, when an epoch is trained again (after a fallback to
# an older checkpoint), ``checkpoint_epoch_<epoch>.<attempt>``: a name is never reused, because Ray Train's checkpoint
# manager keys its bookkeeping by folder path. Reporting an existing name again gives it two entries for one folder
# (ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py, register_checkpoint), and when it evicts the
# older entry (CheckpointConfig.num_to_keep) it deletes the folder the newer one still lists in its snapshot: the
# next start then fails with CheckpointManagerInitializationError ("a checkpoint that does not exist anymore").
CHECKPOINT_PREFIX = "checkpoint_epoch_"
CHECKPOINT_MANIFEST = "checkpoint.json"  # written last into a checkpoint: its epoch and every file's size
DAMAGED_MARK = "damaged.txt"
_CHECKPOINT = re.compile(r"^checkpoint_epoch_(\d+)(?:\.(\d+))?$")


def checkpoint_key(name: str) -> Optional[tuple[int, int]]:
    """(epoch, attempt) of a checkpoint folder name, its order; None for anything else."""
    m = _CHECKPOINT.match(name)
    return (int(m.group(1)), int(m.group(2) or 1)) if m else None


def checkpoint_dir_name(epoch: int, taken) -> str:
    """The folder name of epoch ``epoch``'s checkpoint: never one in ``taken`` (see CHECKPOINT_PREFIX)."""
    name, attempt = f"{CHECKPOINT_PREFIX}{epoch:04d}", 1
    while name in taken:
        attempt += 1
        name = f"{CHECKPOINT_PREFIX}{epoch:04d}.{attempt}"
    return name


def checkpoint_manifest(folder: Path, epoch: int) -> dict:
    """The manifest of a checkpoint folder whose files are all written: its epoch and each file's size."""
    files = {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir())
             if p.is_file() and p.name not in (CHECKPOINT_MANIFEST, DAMAGED_MARK) and not _PARTIAL.search(p.name)}
    return {"format": "kcd_ray-checkpoint/1", "epoch": int(epoch), "files": files}


def manifest_problem(manifest: Optional[dict], sizes: dict[str, int]) -> Optional[str]:
    """Why a checkpoint folder with these file sizes is incomplete (None: complete, as its manifest says)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"no readable {CHECKPOINT_MANIFEST} (written last: the checkpoint was never completed)"
    for f, n in manifest["files"].items():
        if f not in sizes:
            return f"{f} is missing"
        if sizes[f] != n:
            return f"{f} has {sizes[f]} bytes, {CHECKPOINT_MANIFEST} says {n} (truncated or rewritten)"
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


class RunDir:
    def __init__(self, path: str | os.PathLike, remote: str = ""):
        self.path = Path(path)
        self.remote = remote  # the run's URI when run.storage_path is an object store, else ""
        self._synced: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) as last uploaded/downloaded

    def __getstate__(self):  # the sync bookkeeping is per process
        return {"path": self.path, "remote": self.remote, "_synced": {}}

    @property
    def where(self) -> str:
        """The run folder as a user sees it: its URI, or its path."""
        return self.remote or str(self.path)

    def _sig(self, f: Path) -> tuple[int, int]:
        st = f.stat()
        return st.st_size, st.st_mtime_ns

    def sync_up(self, under: str = "") -> int:
        """Upload the files (under ``under``) changed since the last sync, delete the removed ones; returns the
        number of objects written or deleted. A no-op for a local run folder."""
        if not self.remote:
            return 0
        base = self.path / under if under else self.path
        files = [base] if base.is_file() else (base.rglob("*") if base.is_dir() else [])
        now = {f.relative_to(self.path).as_posix(): self._sig(f) for f in files
               if f.is_file() and f.name != storage.STAGE_MARK and not any(_PARTIAL.search(p) for p in f.parts)}
        changed = [rel for rel, sig in now.items() if self._synced.get(rel) != sig]
        for rel in changed:
            storage.upload(self.path / rel, storage.join(self.remote, rel))
            self._synced[rel] = now[rel]
        prefix = under.rstrip("/") + "/" if under else ""
        gone = [rel for rel in self._synced if rel not in now and (rel == under or rel.startswith(prefix))]
        for rel in gone:
            storage.delete(storage.join(self.remote, rel))
            del self._synced[rel]
        return len(changed) + len(gone)

    def sync_down(self, fresh: bool = False) -> int:
        """Fetch the run's files (not Ray Train's checkpoints) into the working copy; ``fresh`` first empties it,
        so it mirrors the store exactly (a driver opening a run); otherwise files only here are kept."""
        if not self.remote:
            return 0
        if fresh:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        rels = [r for r in storage.list_files(self.remote) if not ray_owned(r)]
        for rel in rels:
            storage.download(storage.join(self.remote, rel), self.path / rel)
            self._synced[rel] = self._sig(self.path / rel)
        return len(rels)

    def checkpoint_folders(self) -> dict[str, dict[str, int]]:
        """Every Ray Train checkpoint folder, complete or not: name -> {file: size} (in the store for a remote
        run: one listing)."""
        if self.remote:
            sizes = storage.list_sizes(self.remote)
        else:
            sizes = {p.relative_to(self.path).as_posix(): p.stat().st_size
                     for p in self.path.glob(f"{CHECKPOINT_PREFIX}*/*") if p.is_file()}
        out: dict[str, dict[str, int]] = {}
        for rel, size in sizes.items():
            top, _, rest = rel.partition("/")
            if checkpoint_key(top) is not None and rest and "/" not in rest:
                out.setdefault(top, {})[rest] = size
        return dict(sorted(out.items(), key=lambda kv: checkpoint_key(kv[0])))

    def checkpoint_problems(self) -> dict[str, Optional[str]]:
        """name -> why the checkpoint folder is not complete (None: complete), oldest first. Complete: its
        manifest (``checkpoint.json``, written last) lists every file with its size, and no load marked it
        damaged. A run written before manifests existed (no folder has one) takes folders holding a state.pt."""
        folders = self.checkpoint_folders()
        legacy = not any(CHECKPOINT_MANIFEST in files for files in folders.values())
        out = {}
        for name, files in folders.items():
            if DAMAGED_MARK in files:
                out[name] = "marked damaged by an earlier load (" + DAMAGED_MARK + ")"
            elif legacy:
                out[name] = None if "state.pt" in files else "no state.pt"
            else:
                manifest = self.read_json(f"{name}/{CHECKPOINT_MANIFEST}") if CHECKPOINT_MANIFEST in files else None
                out[name] = manifest_problem(manifest, files)
        return out

    def checkpoint_names(self) -> list[str]:
        """The complete Ray Train checkpoint folders (in the store for a remote run), oldest first."""
        return [n for n, problem in self.checkpoint_problems().items() if problem is None]

    def checkpoint_epoch(self, name: str) -> Optional[int]:
        """The epoch a checkpoint folder holds (its manifest's; the folder name's for a run without manifests)."""
        manifest = self.read_json(f"{name}/{CHECKPOINT_MANIFEST}")
        if manifest is not None and isinstance(manifest.get("epoch"), int):
            return manifest["epoch"]
        key = checkpoint_key(name)
        return key[0] if key else None

    def read_json(self, rel: str) -> Optional[dict]:
        """A JSON file of the run (in the store for a remote run: Ray Train's checkpoints are only there); None
        when it is missing or unreadable."""
        try:
            text = storage.read_text(storage.join(self.remote, rel)) if self.remote else (self.path / rel).read_text()
            return json.loads(text)
        except (OSError, ValueError):
            return None

    def mark_damaged(self, name: str, reason: str) -> None:
        """Leave a note in a checkpoint folder whose load failed, so later starts skip it without loading it. The
        folder itself stays: Ray Train's snapshot may list it (deleting it would make the run unresumable)."""
        try:
            if self.remote:
                storage.write_text(storage.join(self.remote, name, DAMAGED_MARK), reason + "\n")
            elif (self.path / name).is_dir():
                (self.path / name / DAMAGED_MARK).write_text(reason + "\n")
        except OSError:
            pass

    def sub(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_text(self, rel: str, text: str) -> Path:
        """Atomic write: a crash never leaves a half-written file behind."""
        p = self.sub(rel)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, p)
        return p

    def write_json(self, rel: str, obj) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=2, default=_jsonable))

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{p}:{i}: not a JSON line (corrupt metrics file)") from None
        return rows

    def write_metrics(self, rows: list[dict]) -> Path:
        """Rewrite metrics.jsonl as exactly these rows (on resume, epochs past the checkpoint are dropped)."""
        return self.write_text("metrics.jsonl", "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
