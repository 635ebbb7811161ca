"""A per-sample embedding memory for contrastive distillers (CRD, HKD), DDP-aware.

Rows are indexed by the *original* training ``sample_id`` (0..N-1), so the bank works unchanged on a
condensed set (some ids never come) and on VAKS-blended images (the id of the kept sample).

The banks are not registered buffers: DDP would broadcast N x dim tensors from rank 0 on every step.
They are kept identical on every rank instead (same seeded initialisation, and every update uses the
embeddings and ids all-gathered from all ranks), and reach ``state_dict()`` through the module's
extra state, so checkpoints and resume include them. ``_apply`` moves them with ``.to(device)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` (detached), in rank order; per-rank sizes along dim 0 may differ."""
    x = x.detach().contiguous()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = torch.cat([x, x.new_zeros((max(counts) - x.shape[0],) + tuple(x.shape[1:]))])
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return [o[:c] for o, c in zip(out, counts)]


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (no grad) over all ranks along dim 0; per-rank sizes may differ."""
    if not distributed():
        return x
    return torch.cat(_gather_parts(x))


def all_gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` over all ranks along dim 0 (per-rank sizes may differ), and the offset of this
    rank's rows in the result. Unlike ``all_gather_cat``, this rank's rows are ``x`` itself, so they keep
    their autograd graph; the other ranks' rows are constants."""
    if not distributed():
        return x, 0
    parts = _gather_parts(x)
    rank = dist.get_rank()
    parts[rank] = x
    return torch.cat(parts), sum(len(q) for q in parts[:rank])


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


class MemoryBank(nn.Module):
    """Unit-norm embeddings per view (e.g. ``("student", "teacher")``) plus the last seen label."""

    def __init__(self, num_samples: int, dim: int, views: Sequence[str] = ("student", "teacher"),
                 momentum: float = 0.5, seed: int = 0):
        super().__init__()
        self.num_samples, self.dim, self.momentum = int(num_samples), int(dim), float(momentum)
        # A fixed generator, not the global RNG: every DDP rank starts from the same bank.
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(dim / 3)
        self.banks = {v: torch.rand(self.num_samples, self.dim, generator=g).mul_(2 * stdv).add_(-stdv) for v in views}
        self.labels = torch.full((self.num_samples,), -1, dtype=torch.long)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {"banks": {k: v.detach().cpu() for k, v in self.banks.items()}, "labels": self.labels.cpu()}

    def set_extra_state(self, state: dict) -> None:
        for k, v in state["banks"].items():
            if k not in self.banks or v.shape != self.banks[k].shape:
                raise ValueError(
                    f"memory bank {k!r}: checkpoint holds shape {tuple(v.shape)}, this run expects "
                    f"{tuple(self.banks[k].shape) if k in self.banks else 'no such view'} "
                    f"(num_samples or feat_dim changed?)"
                )
            self.banks[k].copy_(v)
        self.labels.copy_(state["labels"])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.banks = {k: fn(v) for k, v in self.banks.items()}
        self.labels = fn(self.labels)
        return self

    # ------------------------------------------------------------------ use
    def check_ids(self, ids: torch.Tensor) -> None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_samples:
            raise ValueError(
                f"batch.sample_id: ids must lie in [0, {self.num_samples}) (distill.options.num_samples, the number "
                f"of original training samples); got ids from {lo} to {hi}"
            )

    def get(self, view: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows for ``idx`` of any shape -> idx.shape + (dim,), detached."""
        return self.banks[view].index_select(0, idx.reshape(-1)).view(*idx.shape, self.dim).detach()

    def sample_negatives(self, ids: torch.Tensor, labels: torch.Tensor, k: int, other_class: bool = True,
                         rounds: int = 4) -> torch.Tensor:
        """(B, k) random ids, redrawn (a few rounds) where they hit the anchor itself or, with
        ``other_class``, a sample last seen with the anchor's label (RepDistiller's 'exact' mode
        draws negatives from the other classes)."""
        bank = self.banks[next(iter(self.banks))]
        neg = torch.randint(0, self.num_samples, (ids.shape[0], k), device=bank.device)
        ids, labels = ids.to(bank.device).view(-1, 1), labels.to(bank.device).view(-1, 1)
        for _ in range(rounds):
            bad = neg == ids
            if other_class:
                bad |= self.labels[neg] == labels
            if not bool(bad.any()):
                break
            neg = torch.where(bad, torch.randint_like(neg, 0, self.num_samples), neg)
        return neg

    @torch.no_grad()
    def record_labels(self, ids: torch.Tensor, labels: torch.Tensor, gathered: bool = False) -> None:
        """Remember the label of every sample of the batch (all ranks' batches unless ``gathered``:
        then ``ids``/``labels`` already hold them)."""
        if not gathered:
            ids, labels = all_gather_cat(ids.detach()), all_gather_cat(labels.detach())
        self.labels.index_copy_(0, ids.to(self.labels.device), labels.to(self.labels.device))

    @torch.no_grad()
    def update(self, ids: torch.Tensor, labels: torch.Tensor, gathered: bool = False,
               **embeddings: torch.Tensor) -> None:
        """Momentum update of the rows of ``ids`` with new embeddings, using every rank's batch
        (``gathered=True``: the arguments already are the all-gathered batch, as HKD has them)."""
        if not gathered:
            ids, labels = all_gather_cat(ids.detach()), all_gather_cat(labels.detach())
        self.record_labels(ids, labels, gathered=True)
        for view, emb in embeddings.items():
            bank = self.banks[view]
            emb = emb.detach().to(bank.dtype) if gathered else all_gather_cat(emb.detach().to(bank.dtype))
            idx = ids.to(bank.device)
            rows = bank.index_select(0, idx).mul_(self.momentum).add_(emb.to(bank.device), alpha=1 - self.momentum)
            bank.index_copy_(0, idx, F.normalize(rows, dim=1))
