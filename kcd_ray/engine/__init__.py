"""The training engine: plain torch, no Ray.

``Engine`` owns the step and the epoch (forward through the distiller, loss, backward, optimiser, AMP, skipped
non-finite steps, evaluation, the metrics row and the run checkpoint). Everything else plugs in as a
:class:`~kcd_ray.engine.hooks.Hook` (KCD's condenser, the AB/FT/FSP initialisation stage, the metrics writer,
test-only fault injection). What the engine needs from the outside world (publishing a mask, scoring the
training set, reporting a checkpoint) comes through a :class:`~kcd_ray.engine.context.Services` object, which
the Ray layer implements with Ray and the unit tests with plain Python. A run's decisions are made before it trains
(:mod:`kcd_ray.engine.plan`); :func:`~kcd_ray.engine.assemble.assemble_engine` builds an engine from them.
"""

from kcd_ray.engine.context import LocalServices, RunContext, Services
from kcd_ray.engine.engine import Engine
from kcd_ray.engine.hooks import HOOKS, Hook
from kcd_ray.engine.assemble import assemble_engine, build_hooks

__all__ = ["HOOKS", "Engine", "Hook", "LocalServices", "RunContext", "Services", "assemble_engine", "build_hooks"]
