"""One way to assemble an engine: from a run plan (or a config, for a run driven in this process), a device,
services and extra hooks. The Ray Train worker, the tests and the benchmarks all call :func:`assemble_engine`.

The hook list of a run (:func:`run_hooks`): the init stage, the curriculum (before the strategy: KCD condenses
within its selection), the one data-selection strategy the plan names, the compute ledger, the metrics writer
(after the hooks that fill in the row), the trackers, then extra hooks (test and drill hooks such as ``fail`` act
after the row is written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from kcd_ray.config import Config
from kcd_ray.engine.build import build_components
from kcd_ray.engine.context import LocalServices, RunContext, Services
from kcd_ray.engine.curriculum import curriculum_hooks
from kcd_ray.engine.engine import Engine
from kcd_ray.engine.hooks import HOOKS, Hook
from kcd_ray.engine.ledger import ComputeLedger
from kcd_ray.engine.parts import InitStage, MetricsWriter
from kcd_ray.engine.plan import RunPlan, local_plan
from kcd_ray.engine.rundir import RunDir
from kcd_ray.engine.selection import SelectionStrategy


def hook_specs(specs) -> tuple:
    """``[("name", {kwargs}) | "name" | (HookClass, {kwargs}) | HookClass]`` -> ``((HookClass, kwargs), ...)``:
    names are looked up in ``HOOKS`` here, on the driver, so the classes travel to the workers with the plan."""
    from kcd_ray.engine import faults  # noqa: F401 - registers the drill hooks (fail, record_ids, ...)

    out = []
    for spec in specs or ():
        target, kwargs = (spec, {}) if isinstance(spec, (str, type)) else spec
        cls = HOOKS.get(target) if isinstance(target, str) else target
        if not (isinstance(cls, type) and issubclass(cls, Hook)):
            raise ValueError(f"hooks: {target!r} is not a registered hook name or a Hook subclass")
        if issubclass(cls, SelectionStrategy):
            raise ValueError(f"hooks: {cls.__name__} would run a second data-selection strategy; choose it with "
                             "selection.strategy")
        out.append((cls, dict(kwargs)))
    return tuple(out)


def build_hooks(specs) -> list[Hook]:
    return [cls(**kwargs) for cls, kwargs in hook_specs(specs)]


def run_hooks(ctx: RunContext, num_train: int, extra=()) -> list[Hook]:
    """The hook list of a run (module docstring)."""
    from kcd_ray.engine.selection import build_strategy

    hooks: list[Hook] = [InitStage()]
    hooks += curriculum_hooks(ctx.cfg, ctx.kind, ctx.data_dir)
    strategy = build_strategy(ctx, num_train)
    if strategy is not None:
        hooks.append(strategy)
    hooks += [ComputeLedger(), MetricsWriter()]
    if ctx.cfg.run.trackers:  # after the writer: its files (metrics, final model, summary) exist when logged
        from kcd_ray.engine.trackers import Trackers

        hooks.append(Trackers(ctx.cfg.run.trackers, chief=ctx.is_chief))
    return hooks + build_hooks(extra)


def assemble_engine(source: Union[RunPlan, Config], device: torch.device, services: Optional[Services] = None, *,
                    ctx: Optional[RunContext] = None, kind: str = "distill", data_dir=None, run_dir=None,
                    hooks=(), teacher_cache=None, distributed: bool = False) -> Engine:
    """An engine for the run ``source`` describes: a :class:`RunPlan` (the driver's), or a config whose data set
    is prepared at ``data_dir`` and whose run folder is ``run_dir`` (a run driven in this process; a built
    ``teacher_cache`` stands in for the teacher where it can). ``ctx``: this rank's context (a Train worker's);
    ``services``: plain-Python ones by default (checkpoints in ``<run folder>/local_checkpoint``); ``hooks``:
    extra hooks after the plan's own (``hook_specs`` forms, or Hook instances for a run in this process)."""
    if isinstance(source, RunPlan):
        plan = source
    else:
        if data_dir is None:
            raise ValueError("assemble_engine: a config needs data_dir (the prepared data set)")
        plan = local_plan(source, kind, data_dir, run_dir, teacher_cache=teacher_cache)
    ctx = ctx or RunContext.from_plan(plan)
    if not ctx.run_dir.remote:
        ctx.run_dir.path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(ctx.cfg.optim.seed + ctx.rank)
    parts = build_components(ctx, device, distributed=distributed)
    services = services or LocalServices(checkpoint_dir=Path(ctx.run_dir.path) / "local_checkpoint")
    built = [h for h in hooks if isinstance(h, Hook)]  # instances (in-process runs), after the specs' hooks
    specs = (*plan.hooks, *hook_specs([h for h in hooks if not isinstance(h, Hook)]))
    return Engine(ctx, parts, run_hooks(ctx, parts.num_train, specs) + built, services, device)


def epoch_columns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names, prefixes) of the numeric metrics-row columns a run can report: the engine's own and every
    registered part's declared ones (hooks, strategies, curricula). What a sweep may name as its metric."""
    from kcd_ray.engine.curriculum import CURRICULA
    from kcd_ray.engine.engine import ENGINE_COLUMNS, LOSS_PREFIX, VAL_COLUMNS
    from kcd_ray.engine.selection import STRATEGIES

    parts = [cls for reg in (HOOKS, STRATEGIES, CURRICULA) for _, cls in reg.items()]
    names = dict.fromkeys(ENGINE_COLUMNS + VAL_COLUMNS + tuple(c for p in parts for c in p.columns))
    prefixes = dict.fromkeys((LOSS_PREFIX,) + tuple(c for p in parts for c in p.column_prefixes))
    return tuple(names), tuple(prefixes)


__all__ = ["RunDir", "assemble_engine", "build_hooks", "epoch_columns", "hook_specs", "run_hooks"]
