"""When the M-step runs and how many samples it keeps (docs/methods/kcd.md §4).

Condensation happens at the START of epoch ``e`` (before that epoch is trained) when
``e > 0``, ``e % interval == 0`` and ``e >= warmup``. With the CIFAR recipe (240 epochs,
interval 40, rho 0.7, 6 stages) that is epochs 40, 80, ..., 200, so the six 40-epoch blocks
train on 100, 95, 90, 85, 80 and 75% of the data: 87.5% of plain KD's sample-passes.

Condensation keeps happening every interval after the floor ``floor(rho N)`` is reached: the
size no longer shrinks, but the kept set is re-selected (dropped samples can return).

Sizes are computed on the decimal value of ``rho`` (``Fraction(repr(rho))``), so that
``N = 10, rho = 0.9`` removes exactly 1 sample rather than ``floor(0.9999999999999998) = 0``.
The one deviation from the paper (docs/methods/kcd.md §4, §10): the floor is ``max(floor(rho N), 1)``, for tiny
``N * rho < 1``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

SHAPES = ("step", "linear", "cosine")


def _exact(x: float) -> Fraction:
    return Fraction(repr(float(x)))


class CondensationSchedule:
    def __init__(self, num_samples: int, rho: float = 0.7, stages: int = 6, interval: int = 40, warmup: int = 0,
                 shape: str = "step"):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples: expected >= 1, got {num_samples!r}")
        if not 0 < rho <= 1:
            raise ValueError(f"kcd.rho: expected 0 < rho <= 1, got {rho!r}")
        if int(stages) < 1:
            raise ValueError(f"kcd.stages: expected >= 1, got {stages!r}")
        if int(interval) < 1:
            raise ValueError(f"kcd.interval: expected >= 1, got {interval!r}")
        if int(warmup) < 0:
            raise ValueError(f"kcd.warmup: expected >= 0, got {warmup!r}")
        if shape not in SHAPES:
            raise ValueError(f"kcd.shape: expected one of {', '.join(SHAPES)}, got {shape!r}")
        self.num_samples = int(num_samples)
        self.rho = float(rho)
        self.stages = int(stages)
        self.interval = int(interval)
        self.warmup = int(warmup)
        self.shape = shape
        n, r = self.num_samples, _exact(rho)
        # floor(rho N): the size never goes below it (nor below 1: an empty kept set cannot train)
        self.floor_size = max(math.floor(r * n), 1)
        self.step_size = math.floor(n * (1 - r) / self.stages)  # floor(N (1 - rho) / stages)

    def is_condense_epoch(self, epoch: int) -> bool:
        """True when condensation runs at the start of ``epoch`` (0-based)."""
        return epoch > 0 and epoch % self.interval == 0 and epoch >= self.warmup

    def next_size(self, k_current: int, stage: int) -> int:
        """Kept size after the ``stage``-th condensation (1-based) when ``k_current`` are kept now.

        step:   max(K - floor(N (1 - rho) / stages), floor(rho N))  -- docs/methods/kcd.md §4.
        linear/cosine: floor(N - (N - floor(rho N)) * f(min(stage / stages, 1))), f(x) = x or
        (1 - cos(pi x)) / 2. All shapes are clamped to [floor(rho N), K]: never below the
        floor, never growing.
        """
        k = int(k_current)
        if not 0 <= k <= self.num_samples:
            raise ValueError(f"k_current: expected 0..{self.num_samples}, got {k_current!r}")
        if int(stage) < 1:
            raise ValueError(f"stage: expected >= 1 (the first condensation is stage 1), got {stage!r}")
        n, m = self.num_samples, self.floor_size
        if self.shape == "step":
            target = k - self.step_size
        else:
            x = Fraction(min(int(stage), self.stages), self.stages)
            if self.shape == "linear":
                target = math.floor(n - (n - m) * x)  # exact
            else:
                f = (1.0 - math.cos(math.pi * float(x))) / 2.0
                target = math.floor(n - (n - m) * f + 1e-9)  # 1e-9: cos rounding must not cost a sample
        return min(k, max(int(target), m))

    def planned_sizes(self, epochs: int) -> np.ndarray:
        """Kept size trained on in each epoch 0..epochs-1, if every planned condensation runs."""
        sizes = np.empty(int(epochs), np.int64)
        k, stage = self.num_samples, 0
        for e in range(int(epochs)):
            if self.is_condense_epoch(e):
                stage += 1
                k = self.next_size(k, stage)
            sizes[e] = k
        return sizes

    def planned_sample_passes(self, epochs: int) -> int:
        """Total samples trained on over ``epochs`` epochs (plain KD: N * epochs)."""
        return int(self.planned_sizes(epochs).sum())

    def planned_compute_ratio(self, epochs: int) -> float:
        """Sample-passes relative to plain KD over the same epochs (0.875 for the recipe)."""
        return self.planned_sample_passes(epochs) / (self.num_samples * int(epochs)) if epochs > 0 else 1.0

    def __repr__(self) -> str:
        return (f"CondensationSchedule(N={self.num_samples}, rho={self.rho}, stages={self.stages}, "
                f"interval={self.interval}, warmup={self.warmup}, shape={self.shape!r})")
