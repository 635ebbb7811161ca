"""torch.distributed helpers that are no-ops in a single process (in-process runs, unit tests)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(values: list, device) -> list[float]:
    """Sum a list of numbers (or 0-d tensors) over ranks; one host read for the whole list."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]) if values \
        else torch.zeros(0, dtype=torch.float64, device=device)
    if active():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (torch's ``broadcast_object_list``)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """Every rank's object, in rank order."""
    if not active():
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_per_sample(ids: list, values: list):
    """One epoch's per-step (host id tensor, device value tensor) lists -> (ids int64, values float32) of every
    rank, concatenated in rank order: one host read, one all-gather."""
    import numpy as np

    local_ids = torch.cat(ids).numpy().astype(np.int64) if ids else np.zeros(0, np.int64)
    local_vals = torch.cat(values).float().cpu().numpy() if values else np.zeros(0, np.float32)
    parts = all_gather_objects((local_ids, local_vals))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
