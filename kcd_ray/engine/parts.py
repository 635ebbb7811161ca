"""The production hooks besides KCD's condenser, and the list a run is built with.

- ``InitStage`` (AB, FT, FSP): train the method's connectors on the full data set before distillation.
- ``MetricsWriter``: rank 0 writes ``metrics.jsonl``, ``best_model.pt``, the epoch line, and at the end
  ``final_model.pt`` and ``summary.json``.
"""

from __future__ import annotations

import torch

from kcd_ray.engine.condenser import Condenser  # noqa: F401 - registers the "kcd" hook
from kcd_ray.engine.context import RunContext
from kcd_ray.engine.curriculum import curriculum_hooks
from kcd_ray.engine.hooks import HOOKS, Hook, build_hooks
from kcd_ray.engine.ledger import ComputeLedger
from kcd_ray.engine.metrics import format_epoch, say
from kcd_ray.engine.selection import STRATEGY_HOOK_NAMES, build_strategy
from kcd_ray.models import save_model


@HOOKS.register("init_stage")
class InitStage(Hook):
    """Two-stage methods: their connectors are trained first, with the student frozen (only at a fresh start).

    The stage's data epochs are numbered -1, -2, ... so its shuffle and augmentation never coincide with
    the distillation epochs' (which are seeded by epoch number)."""

    def before_run(self, engine, start_epoch: int) -> None:
        raw, cfg = engine.distiller, engine.cfg
        n = raw.init_stage_epochs() if hasattr(raw, "init_stage_epochs") else 0
        if not n or start_epoch > 0:
            return
        opt = torch.optim.SGD(list(raw.init_stage_parameters()), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay)
        engine.model.train()
        for e in range(n):
            engine.begin_data_epoch(-(e + 1))
            total = torch.zeros((), device=engine.device)
            count = 0
            for raw_batch in engine.train_batches(-(e + 1)):
                batch = engine.to_device(raw_batch)
                with engine.parts.amp_ctx:
                    loss = sum(engine.model(batch, T=1.0, epoch=0, init_stage=True).losses.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * batch["label"].shape[0]
                count += batch["label"].shape[0]
            if engine.ctx.verbose:
                say(f"[kcd_ray] init stage ({cfg.distill.method}) {e + 1}/{n}: loss {float(total) / max(count, 1):.4f}")


@HOOKS.register("metrics_writer")
class MetricsWriter(Hook):
    def before_run(self, engine, start_epoch: int) -> None:
        if engine.ctx.is_chief and start_epoch > 0:
            engine.ctx.run_dir.write_metrics(engine.history)  # drop epochs past the checkpoint

    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        """After the checkpoint: metrics.jsonl never runs ahead of what a resume restores."""
        if not engine.ctx.is_chief:
            return
        run_dir = engine.ctx.run_dir
        run_dir.write_metrics(engine.history)
        # complete_model is False before ED's last grade: the student's native head is not trained yet.
        if row["evaluated"] and row["top1"] >= row["best_top1"] and row.get("complete_model", True):
            save_model(run_dir.path / "best_model.pt", engine.distiller.student, extra={"epoch": epoch, "top1": row["top1"]})
        if engine.ctx.verbose:
            say("[kcd_ray] " + format_epoch(row))

    def end_run(self, engine, summary) -> None:
        if summary is None:
            return
        run_dir = engine.ctx.run_dir
        save_model(run_dir.path / "final_model.pt", engine.distiller.student,
                   extra={"epoch": engine.cfg.optim.epochs - 1, "top1": engine.history[-1]["top1"]})
        run_dir.write_json("summary.json", summary)


def run_hooks(ctx: RunContext, num_train: int, extra: list | None = None) -> list[Hook]:
    """The hook list of a run: init stage, the one data-selection strategy (``selection.strategy``; ``auto``:
    KCD with ``kcd.enabled``, else none; see ``kcd_ray.engine.selection``), the compute ledger, the metrics
    writer (after the hooks that fill in the row), then extras (test hooks such as ``fail`` act after the row
    is written)."""
    hooks: list[Hook] = [InitStage()]
    # A curriculum (ED's grades, a class subset) before the strategy: KCD condenses within its selection.
    hooks += curriculum_hooks(ctx.cfg, ctx.kind, ctx.data_dir)
    strategy = build_strategy(ctx, num_train)
    if strategy is not None:
        hooks.append(strategy)
    hooks.append(ComputeLedger())
    hooks.append(MetricsWriter())
    if ctx.cfg.run.trackers:  # after the writer: its files (metrics, final model, summary) exist when logged
        from kcd_ray.engine.trackers import Trackers

        hooks.append(Trackers(ctx.cfg.run.trackers, chief=ctx.is_chief))
    extras = build_hooks(extra or [])
    clash = [h.name for h in extras if h.name in STRATEGY_HOOK_NAMES]
    if clash:
        raise ValueError(f"hooks: {clash} would run a second data-selection strategy; choose it with selection.strategy")
    return hooks + extras
