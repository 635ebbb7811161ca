"""Run checkpoints: the student (in kcd_ray's model format, which `load_model` reads) plus the whole run state.

A checkpoint folder holds ``model.pt`` (student only, ``save_model`` format) and ``state.pt``: the distiller's
trainable modules (connectors, memory banks), optimiser, LR scheduler, AMP scaler, epoch, run history and
each hook's state under ``hooks`` (the whole KCD state: accumulators, mask version, blend bookkeeping); then,
written last, ``checkpoint.json``: its epoch and the size of every file (``kcd_ray.engine.rundir``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from kcd_ray.engine.rundir import CHECKPOINT_MANIFEST, checkpoint_manifest
from kcd_ray.models import CheckpointError, save_model

STATE_FORMAT = "kcd_ray-run-state/2"  # 2: per-hook states under "hooks"


def _unwrap(module):
    ddp = hasattr(module, "module") and isinstance(module, torch.nn.parallel.DistributedDataParallel)
    return module.module if ddp else module


def save_run_checkpoint(path: str | os.PathLike, *, distiller, optimizer, scheduler, scaler, run_state: dict,
                        config: dict, hooks: dict | None = None) -> Path:
    """Write ``model.pt`` and ``state.pt`` into ``path``; ``hooks`` maps each hook's name to its ``state_dict()``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    d = _unwrap(distiller)
    save_model(path / "model.pt", d.student, extra={"epoch": run_state["epoch"], "top1": run_state.get("last_top1")})
    own = {k: v for k, v in d.state_dict().items() if not k.startswith(("teacher.", "student."))}
    state = {
        "format": STATE_FORMAT,
        "distiller_extra": own,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "hooks": dict(hooks or {}),
        "run": run_state,
        "config": config,
    }
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")
    # Last: the manifest (epoch, every file's size). A folder without it, or whose files differ from it, is
    # a half-written checkpoint (a crash before Ray Train registered it, a half-finished upload): skipped by
    # RunDir.checkpoint_names before any load is tried.
    tmp = path / (CHECKPOINT_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(checkpoint_manifest(path, run_state["epoch"])))
    os.replace(tmp, path / CHECKPOINT_MANIFEST)
    return path


def save_local_checkpoint(folder: str | os.PathLike, **kwargs) -> Path:
    """``save_run_checkpoint`` into ``folder``, replaced whole (see :func:`replace_checkpoint`)."""
    return replace_checkpoint(folder, lambda p: save_run_checkpoint(p, **kwargs))


def replace_checkpoint(folder: str | os.PathLike, write) -> Path:
    """In-process runs keep one checkpoint folder of their own; replace it whole, never half.

    The new checkpoint is written next to it, then swapped in by two renames. A crash at any point leaves
    either the old or the new folder complete (``latest_local_checkpoint`` finds whichever survived), so
    ``model.pt`` and ``state.pt`` always come from the same epoch.
    """
    folder = Path(folder)
    partial, prev = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".prev")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    if folder.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(folder, prev)
    os.replace(partial, folder)
    shutil.rmtree(prev, ignore_errors=True)
    return folder


def latest_local_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The complete in-process checkpoint folder, if any (the previous one after a crash mid-swap)."""
    folder = Path(folder)
    for d in (folder, folder.with_name(folder.name + ".prev")):
        if (d / "state.pt").is_file():
            return d
    return None


def _numpy_globals() -> list:
    """The numpy reconstructors a run state pickles (arrays, dtypes, scalars), allow-listed for weights_only loads."""
    import numpy as np

    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    found = [mod._reconstruct, mod.scalar, np.ndarray, np.dtype]
    return found + [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]


def _load_failure(e: Exception, what: str = "kcd_ray run state") -> str:
    msg = str(e)
    if "Weights only load failed" in msg and "GLOBAL " in msg:  # refused an import: never loaded, never executed
        name = msg.split("GLOBAL ", 1)[1].split(" ", 1)[0]
        return (f"refused: loading it would import {name} (only tensors, Python values and numpy arrays are "
                f"allowed in a {what})")
    return f"not a readable {what} ({type(e).__name__}: {msg.splitlines()[0] if msg else ''})"


def load_run_checkpoint(path: str | os.PathLike) -> dict:
    """Read ``state.pt`` (+ the student weights) from a checkpoint folder; errors name the file."""
    path = Path(path)
    f = path / "state.pt"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; a kcd_ray run checkpoint folder holds model.pt and state.pt")
    try:
        # weights_only: a checkpoint in shared storage must not run code on the workers that resume from it. The
        # run state holds tensors, Python values and the KCD state's numpy arrays: only those numpy types are allowed.
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt (or unsafe) file
        raise CheckpointError(f"{f}: {_load_failure(e)}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{f}: not a kcd_ray run state (expected format {STATE_FORMAT!r})")
    m = path / "model.pt"
    try:
        state["student"] = torch.load(m, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{m}: {_load_failure(e, 'student checkpoint')}") from None
    return state


def restore_into(state: dict, *, distiller, optimizer, scheduler, scaler, source: str) -> dict:
    """Load a checkpoint's state into live objects; a mismatch names the checkpoint."""
    d = _unwrap(distiller)
    try:
        d.student.load_state_dict(state["student"])
        missing, unexpected = d.load_state_dict(state["distiller_extra"], strict=False)
        bad = [k for k in unexpected]
        if bad:
            raise RuntimeError(f"unexpected distiller keys {bad[:8]}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{source}: checkpoint does not match this run's model/config ({e}); use a new run.name to start afresh"
        ) from None
    return state["run"]
