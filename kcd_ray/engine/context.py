"""What a run's engine knows about its surroundings: the typed run context and the services it calls.

``RunContext`` is what one rank knows: its run plan (every decision made before training), the run and data
folders as this process sees them, the mask-store name, rank and world size, and the config it trains with (the
plan's, or an elastic run's with this world size's per-worker batch). ``Services`` is the engine's only door to the
outside (the Ray layer implements it with a MaskStore actor, Ray Data scoring and ``ray.train.report``);
``LocalServices`` does the same in plain Python for in-process unit tests of the engine and its hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np

from kcd_ray.config import Config
from kcd_ray.engine.plan.types import RunPlan
from kcd_ray.engine.rundir import RunDir

KINDS = ("teacher", "distill")


@dataclass(frozen=True)
class RunContext:
    cfg: Config
    kind: str  # "teacher" (CE on labels) or "distill"
    run_dir: RunDir
    data_dir: str
    mask_store: Optional[str] = None  # name of the run's MaskStore (Ray layer); None in pure runs
    rank: int = 0
    world: int = 1
    plan: Optional[RunPlan] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of: {', '.join(KINDS)}")

    @classmethod
    def from_plan(cls, plan: RunPlan, *, run_dir: Optional[RunDir] = None, data_dir: Optional[str] = None,
                  cfg: Optional[Config] = None, **kw) -> "RunContext":
        run_dir = run_dir or RunDir(plan.folder.path, remote=plan.folder.remote)
        return cls(cfg=cfg or plan.cfg, kind=plan.kind, run_dir=run_dir, data_dir=data_dir or plan.data.dir,
                   plan=plan, **kw)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def verbose(self) -> bool:
        return self.cfg.run.verbose > 0 and self.rank == 0


class Services(Protocol):
    """Side effects the engine asks for. Only rank 0 calls ``publish_mask``, ``set_data_epoch`` and
    ``score_offline``; every rank calls ``report`` (Ray Train requires it)."""

    def publish_mask(self, version: int, kept_ids: np.ndarray, overlay: Optional[dict]) -> None: ...

    def set_data_epoch(self, epoch: int) -> None: ...

    def score_offline(self, student_state: dict, epoch: int) -> tuple[np.ndarray, np.ndarray]: ...

    def report(self, metrics: dict, checkpoint: Optional[Callable[[Path], None]], epoch: int) -> None: ...


@dataclass
class LocalServices:
    """Plain-Python services: masks and epochs recorded in memory, checkpoints in the run folder.

    ``scorer(student_state, epoch) -> (ids, values)`` serves the offline E-step (tests pass a plain torch
    loop over the training set).
    """

    checkpoint_dir: Optional[Path] = None
    scorer: Optional[Callable[[dict, int], tuple[np.ndarray, np.ndarray]]] = None
    masks: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    reports: list = field(default_factory=list)

    def publish_mask(self, version, kept_ids, overlay) -> None:
        self.masks.append((int(version), np.asarray(kept_ids).copy(), overlay))

    def set_data_epoch(self, epoch: int) -> None:
        self.epochs.append(int(epoch))

    def score_offline(self, student_state: dict, epoch: int):
        if self.scorer is None:
            raise RuntimeError("kcd.estep=offline needs a scorer; LocalServices(scorer=...) was not given one")
        return self.scorer(student_state, epoch)

    def report(self, metrics: dict, checkpoint, epoch: int) -> None:
        from kcd_ray.engine.checkpoint import replace_checkpoint

        if checkpoint is not None and self.checkpoint_dir is not None:
            replace_checkpoint(self.checkpoint_dir, checkpoint)
        self.reports.append(dict(metrics))

    def latest_checkpoint(self) -> Optional[Path]:
        from kcd_ray.engine.checkpoint import latest_local_checkpoint

        return latest_local_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None else None

    @property
    def mask(self) -> Any:
        """The newest published (kept ids, overlay), or (None, None) before the first condensation."""
        return (self.masks[-1][1], self.masks[-1][2]) if self.masks else (None, None)
