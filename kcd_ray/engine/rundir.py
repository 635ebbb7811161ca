"""The run folder: ``<storage_path>/<name>/`` holds Ray Train's checkpoints and kcd_ray's own files.

Layout: ``config.yaml``, ``metrics.jsonl`` (one JSON object per epoch), ``summary.json``,
``masks/mask_v<k>.parquet``, ``values/`` (E-step value tables) and ``blends/`` (the VAKS overlay).
Paths must be file-system paths (local disk, or NFS/EFS shared by every node on a cluster).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


def resolve_storage(storage_path: str) -> Path:
    if "://" in storage_path:
        raise ValueError(
            f"run.storage_path: {storage_path!r} is a URI; kcd_ray writes masks and blends next to the checkpoints and "
            "needs a file-system path (a local folder, or an NFS/EFS mount shared by all nodes)"
        )
    return Path(os.path.expanduser(storage_path)).resolve()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

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
