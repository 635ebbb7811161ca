"""Two production hooks every run has (the list they join is ``kcd_ray.engine.assemble.run_hooks``):

- ``InitStage`` (AB, FT, FSP): train the method's connectors on the full data set before distillation.
- ``MetricsWriter``: rank 0 writes ``metrics.jsonl``, ``best_model.pt``, the epoch line, and at the end
  ``final_model.pt`` and ``summary.json``.
"""

from __future__ import annotations

import torch

from kcd_ray.engine.hooks import HOOKS, Hook
from kcd_ray.engine.metrics import format_epoch, say
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
        # best_model.pt: the epoch run.select picks (best on validation with a validation split)
        if row["evaluated"] and row["selected_epoch"] == epoch and row.get("complete_model", True):
            extra = {"epoch": epoch, "top1": row["top1"], "selected_by": engine.select,
                     engine.select: row[engine.select]}
            save_model(run_dir.path / "best_model.pt", engine.distiller.student, extra=extra)
        if engine.ctx.verbose:
            say("[kcd_ray] " + format_epoch(row))

    def end_run(self, engine, summary) -> None:
        if summary is None:
            return
        run_dir = engine.ctx.run_dir
        save_model(run_dir.path / "final_model.pt", engine.distiller.student,
                   extra={"epoch": engine.cfg.optim.epochs - 1, "top1": engine.history[-1]["top1"]})
        run_dir.write_json("summary.json", summary)
