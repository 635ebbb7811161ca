"""What a data-selection strategy is: one registered hook class in KCD's slot that declares, on itself, what the
rest of kcd_ray needs to know about it.

A strategy decides what the student trains on (``selection.strategy``; ``auto`` = ``kcd`` when ``kcd.enabled``,
else ``none``). Registering a subclass of :class:`SelectionStrategy` under its name is all it takes to add one:

- its config sub-section ``selection.<name>`` is its ``config_class`` (a dataclass of ``kcd_ray.config._f``
  fields), read as ``cfg.selection.<name>``;
- ``tag``, ``label``, ``colour`` and ``marker`` are how run names and reports show it (recorded in each run's
  ``summary.json``);
- ``images_made(cfg)`` says whether it trains on images the data set does not hold (``"rows"``: some served
  rows, flagged so the teacher sees them; ``"batches"``: every step remakes its batch, so a teacher-output
  cache cannot serve the run);
- ``feed_batch_size(cfg)``: the rows per batch the data feed serves each worker;
- ``planned_fractions(cfg, num_train)``: the share of the training set it expects to train on each epoch
  (forward+backward), and the share it runs through the student forward-only (ranking passes), which the run
  plan turns into an expected compute ratio;
- ``build(ctx, num_train)``: the hook of a run (``cls(ctx.cfg, num_train)`` by default), or None.

The hook itself uses the engine's hook points (:mod:`kcd_ray.engine.hooks`); ``kept_set()`` exposes the samples
it keeps this epoch (drills and tests read it).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np

from kcd_ray.engine.hooks import Hook
from kcd_ray.registry import Registry

# name -> SelectionStrategy subclass; "auto" is an alias resolved by resolve_strategy
STRATEGIES: Registry[type] = Registry("selection strategy", aliases=("auto",))

IMAGES_MADE = ("", "rows", "batches")


class SelectionStrategy(Hook):
    tag: ClassVar[str] = ""  # short name in run names and report keys; "" = the registered name
    label: ClassVar[str] = ""
    colour: ClassVar[str] = ""  # a matplotlib colour; "" = one of the report's spare colours
    marker: ClassVar[str] = "o"
    config_class: ClassVar[Optional[type]] = None  # the dataclass of selection.<name>
    reads_sections: ClassVar[tuple[str, ...]] = ()  # other config sections that change what it does
    makes_images: ClassVar[str] = ""  # one of IMAGES_MADE

    def __init__(self, cfg, num_train: int):
        self.cfg_all, self.num_samples = cfg, int(num_train)

    @classmethod
    def build(cls, ctx, num_train: int) -> Optional[Hook]:
        return cls(ctx.cfg, int(num_train))

    @classmethod
    def check(cls, cfg) -> None:
        """Cross-field checks of a run that uses it (one-line ConfigErrors), before anything runs."""

    @classmethod
    def images_made(cls, cfg) -> str:
        return cls.makes_images

    @classmethod
    def feed_batch_size(cls, cfg) -> int:
        return int(cfg.optim.batch_size)

    @classmethod
    def config_sections(cls, cfg) -> tuple[str, ...]:
        """Dotted config sections whose values change a run of this strategy: a report compares two runs of it
        on these (and on everything outside ``selection`` and ``kcd``)."""
        own = (f"selection.{cls.name}",) if cls.config_class is not None else ()
        return own + tuple(cls.reads_sections)

    @classmethod
    def planned_fractions(cls, cfg, num_train: int) -> tuple[np.ndarray, np.ndarray]:
        """(trained, forward_only): per epoch, the expected share of the N training samples trained on, and the
        share run through the student forward-only. The default: every sample, every epoch."""
        epochs = int(cfg.optim.epochs)
        return np.ones(epochs), np.zeros(epochs)

    @classmethod
    def budget_knobs(cls, cfg, num_train: int) -> list:
        """The config keys a ``selection.budget`` may set (``kcd_ray.engine.plan.budget.Knob``), first the default;
        none: the strategy's compute is what it is."""
        return []

    @classmethod
    def scores_with_teacher_offline(cls, cfg) -> bool:
        """Whether it runs the teacher over the un-augmented training set between epochs (KCD's offline E-step
        with a KD-based value): a teacher-output cache then also holds that view."""
        return False

    @classmethod
    def info(cls, cfg) -> dict:
        """What a report needs to draw a run of this strategy (written into ``summary.json``)."""
        return {"name": cls.name, "tag": cls.tag or cls.name, "label": cls.label or cls.name, "colour": cls.colour,
                "marker": cls.marker, "sections": list(cls.config_sections(cfg))}

    def kept_set(self) -> Optional[np.ndarray]:
        """bool[N]: the samples kept this epoch (None: all)."""
        return None

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Per-sample arrays of its state worth comparing across ranks (drills write them each epoch)."""
        return {}


def resolve_strategy(cfg, kind: str = "distill") -> str:
    """The strategy a run uses: ``auto`` follows ``kcd.enabled``; teacher training never selects."""
    if kind != "distill":
        return "none"
    name = cfg.selection.strategy
    if name == "auto":
        return "kcd" if cfg.kcd.enabled else "none"
    return name


def strategy_class(cfg, kind: str = "distill") -> type:
    return STRATEGIES.get(resolve_strategy(cfg, kind))


def strategy_seed(cfg) -> int:
    return int(cfg.optim.seed if cfg.selection.seed is None else cfg.selection.seed)


def seed_words(*xs: int) -> list[int]:
    return [int(x) & 0xFFFFFFFF for x in xs]


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    """The generator of one epoch's draws: a pure function of (seed, epoch[, rank])."""
    return np.random.default_rng(seed_words(seed, epoch, *more))


def feed_batch_size(cfg, kind: str = "distill") -> int:
    """Rows per batch the data pipeline must serve each worker (UNIXKD: its candidate batch)."""
    return strategy_class(cfg, kind).feed_batch_size(cfg) if kind == "distill" else int(cfg.optim.batch_size)


def build_strategy(ctx, num_train: int) -> Optional[Hook]:
    """The one selection hook of a run (None for plain KD and teacher training): the class the run plan resolved
    (it travels to the workers with the plan, registered there or not), else the registered one."""
    cls = ctx.plan.selection.cls if ctx.plan is not None else strategy_class(ctx.cfg, ctx.kind)
    return cls.build(ctx, int(num_train))


@STRATEGIES.register("none")
class PlainKD(SelectionStrategy):
    """Every sample, every epoch: the baseline every strategy is compared with."""

    name, tag = "none", "kd"
    label, colour, marker = "plain KD", "tab:red", "*"

    @classmethod
    def build(cls, ctx, num_train: int) -> Optional[Hook]:
        return None
