"""Data-selection strategies: the hooks that decide what the student trains on, in the slot KCD occupies.

``selection.strategy`` picks exactly one (``auto`` = ``kcd`` when ``kcd.enabled`` else ``none``). Each is one
registered :class:`~kcd_ray.engine.selection.base.SelectionStrategy` subclass that declares what the rest of
kcd_ray needs to know (see ``base``): ``none`` (plain KD, ``base``), ``kcd`` (KCD's condenser,
:mod:`kcd_ray.engine.condenser`), ``infobatch``, ``unixkd`` and ``random`` (their modules here; the methods are
described in docs/methods/rivals.md).

Selections go through the data pipeline exactly as KCD's mask does: ``data_selection`` returns the kept set
(bool[N] by sample id), the engine publishes it before the epoch's data is read. Every rank computes it from
identical state and the same (seed, epoch) generator, so it is the same everywhere.
"""

from kcd_ray.engine.selection.base import (STRATEGIES, PlainKD, SelectionStrategy, build_strategy, epoch_rng,
                                           feed_batch_size, resolve_strategy, seed_words, strategy_class,
                                           strategy_seed)
from kcd_ray.engine.selection.losses import loss_weights, per_sample_loss
from kcd_ray.engine.selection.infobatch import (InfoBatch, InfoBatchConfig, infobatch_keep_ratio, infobatch_prune,
                                                infobatch_prunes)
from kcd_ray.engine.selection.unixkd import UnixKD, UnixKDConfig, uncertainty, unixkd_mask, unixkd_mix, unixkd_sizes
from kcd_ray.engine.selection.random_subset import RandomSubset, RandomSubsetConfig, fraction_size, random_subset
from kcd_ray.engine import condenser as _condenser  # noqa: E402,F401 - registers "kcd"

__all__ = [
    "STRATEGIES", "InfoBatch", "InfoBatchConfig", "PlainKD", "RandomSubset", "RandomSubsetConfig",
    "SelectionStrategy", "UnixKD", "UnixKDConfig", "build_strategy", "epoch_rng", "feed_batch_size", "fraction_size",
    "infobatch_keep_ratio", "infobatch_prune", "infobatch_prunes", "loss_weights", "per_sample_loss",
    "random_subset", "resolve_strategy", "seed_words", "strategy_class", "strategy_seed", "uncertainty",
    "unixkd_mask", "unixkd_mix", "unixkd_sizes",
]
