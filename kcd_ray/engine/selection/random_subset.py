"""Random subsets: a uniformly random subset per epoch, seeded by (seed, epoch), at ``selection.random.fraction``
or at KCD's planned sizes (``follow_kcd_schedule``): the control for KCD at equal compute."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

from kcd_ray.condense.schedule import CondensationSchedule
from kcd_ray.config import _f
from kcd_ray.engine.hooks import Selection
from kcd_ray.engine.selection.base import STRATEGIES, SelectionStrategy, epoch_rng, strategy_seed


@dataclass
class RandomSubsetConfig:
    fraction: float = _f(0.5, gt=0.0, le=1.0, help="kept fraction of the training set, redrawn every epoch")
    follow_kcd_schedule: bool = _f(False, help="kept size per epoch from KCD's schedule (kcd.rho, interval, stages, "
                                               "warmup, shape) instead of fraction: KCD's compute, random samples")


def random_subset(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """bool[n] with exactly k uniformly chosen True."""
    kept = np.zeros(int(n), bool)
    kept[rng.choice(int(n), int(k), replace=False)] = True
    return kept


def fraction_size(n: int, fraction: float) -> int:
    """floor(fraction * n) on the decimal value of ``fraction`` (as KCD's schedule), at least 1."""
    return max(1, math.floor(Fraction(repr(float(fraction))) * int(n)))


@STRATEGIES.register("random")
class RandomSubset(SelectionStrategy):
    name = "random"
    label, colour = "random subset", "tab:gray"
    config_class = RandomSubsetConfig

    def __init__(self, cfg, num_train: int):
        super().__init__(cfg, num_train)
        self.seed = strategy_seed(cfg)
        self.sizes = planned_sizes(cfg, num_train)
        self.kept: Optional[np.ndarray] = None

    @classmethod
    def config_sections(cls, cfg) -> tuple[str, ...]:
        return ("selection.random", "selection.seed") + (("kcd",) if cfg.selection.random.follow_kcd_schedule else ())

    @classmethod
    def budget_knobs(cls, cfg, num_train: int) -> list:
        from kcd_ray.engine.plan.budget import Knob

        if cfg.selection.random.follow_kcd_schedule:
            return [Knob("kcd.rho", 1.0 / max(num_train, 1), 1.0, hint="kcd.interval, kcd.stages or kcd.warmup")]
        return [Knob("selection.random.fraction", 1.0 / max(num_train, 1), 1.0)]

    @classmethod
    def planned_fractions(cls, cfg, num_train: int) -> tuple[np.ndarray, np.ndarray]:
        sizes = planned_sizes(cfg, num_train)
        return sizes / float(num_train), np.zeros(len(sizes))

    def size(self, epoch: int) -> int:
        return int(self.sizes[min(int(epoch), len(self.sizes) - 1)])

    def before_epoch(self, engine, epoch: int) -> None:
        k = self.size(epoch)
        self.kept = None if k >= self.num_samples else random_subset(self.num_samples, k, epoch_rng(self.seed, epoch))

    def data_selection(self, engine) -> Optional[Selection]:
        return None if self.kept is None else Selection(kept=self.kept)

    def kept_set(self) -> Optional[np.ndarray]:
        return self.kept

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        kept = self.num_samples if self.kept is None else int(self.kept.sum())
        row.update(kept_fraction=kept / self.num_samples)


def planned_sizes(cfg, num_train: int) -> np.ndarray:
    """int[epochs]: the subset size of each epoch (KCD's schedule, or ``fraction`` of N)."""
    r, k, epochs = cfg.selection.random, cfg.kcd, int(cfg.optim.epochs)
    if r.follow_kcd_schedule:
        sched = CondensationSchedule(num_train, rho=k.rho, stages=k.stages, interval=k.interval, warmup=k.warmup,
                                     shape=k.shape)
        return sched.planned_sizes(epochs)
    return np.full(epochs, fraction_size(num_train, r.fraction), np.int64)
