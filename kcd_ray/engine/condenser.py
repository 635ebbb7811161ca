"""KCD as one engine hook: the E-step (online or offline, chosen once), the M-step and publishing the mask.

- ``before_epoch``: at a condensation epoch, the offline E-step first (rank 0 asks the services to score all N
  samples; the table reaches the other ranks by ``broadcast_object_list``), then the M-step on every rank
  (each holds an identical ``KCDState``, so the result is identical everywhere); rank 0 writes the VAKS
  blends (``BlendOverlays``) and the mask file.
- ``data_selection``: (kept, overlay) of the current version; the engine publishes it (intersected with any
  other hook's selection) before the epoch's data is read.
- ``after_step`` (online E-step): instant values of the batch just trained on, kept on the device.
- ``after_epoch`` (online E-step): one host read, an all-gather by sample id over ranks, folded into the
  accumulator; the value table is written before a condensation epoch.
- ``after_checkpoint``: once a checkpoint references the newest mask version, older blend versions go.

The pure algorithm (values, OGVE, schedule, selection, summary plan) is ``kcd_ray.condense``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
import torch

from kcd_ray import storage
from kcd_ray.condense import KCDState
from kcd_ray.condense.schedule import CondensationSchedule
from kcd_ray.condense.values import VALUE_FNS, make_context, needs_teacher
from kcd_ray.config import ConfigError
from kcd_ray.data.blend import BlendOverlays
from kcd_ray.distill.temperature import is_learned
from kcd_ray.engine import distributed as D
from kcd_ray.engine.hooks import Selection
from kcd_ray.engine.selection.base import STRATEGIES, SelectionStrategy
from kcd_ray.engine.metrics import say
from kcd_ray.engine.value_tables import write_value_table


@STRATEGIES.register("kcd")
class Condenser(SelectionStrategy):
    name = "kcd"
    label, colour = "KCD", "tab:blue"
    reads_sections = ("kcd",)
    columns = ("stage", "estep_seconds", "mstep_seconds")

    def __init__(self, cfg, num_train: int, record_values: bool = False):
        super().__init__(cfg, num_train)
        # selection.strategy=kcd runs KCD even when kcd.enabled is false (an explicit strategy wins).
        kcd_cfg = dataclasses.replace(cfg.kcd, enabled=True)
        self.cfg = kcd_cfg
        self.state = KCDState.from_config(kcd_cfg, num_train)
        self.value_fn = VALUE_FNS.get(kcd_cfg.value_fn)
        self.online = kcd_cfg.estep == "online"
        self.record_values = record_values  # write every epoch's value table (tests, analysis)
        self._ids: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._T, self._epoch = 1.0, 0
        self._overlay: Optional[dict] = None  # the blend manifest in force (rank 0)
        self._mstep_s = self._estep_s = 0.0
        self._offline_passes = 0  # samples the offline E-step scored on this rank since the ledger last asked
        self._offline_teacher = 0  # ... and of those, the ones the teacher saw (a cache serves the rest)

    # ------------------------------------------------------------------ what KCD declares
    @classmethod
    def images_made(cls, cfg) -> str:
        return "rows" if cfg.kcd.summary else ""  # VAKS summary blends: served rows the data set does not hold

    @classmethod
    def planned_fractions(cls, cfg, num_train: int) -> tuple[np.ndarray, np.ndarray]:
        """The schedule's planned sizes; the offline E-step scores all N samples at each condensation epoch."""
        k, epochs = cfg.kcd, int(cfg.optim.epochs)
        sched = CondensationSchedule(num_train, rho=k.rho, stages=k.stages, interval=k.interval, warmup=k.warmup,
                                     shape=k.shape)
        trained = sched.planned_sizes(epochs) / float(num_train)
        offline = np.array([float(k.estep == "offline" and sched.is_condense_epoch(e)) for e in range(epochs)])
        return trained, offline

    @classmethod
    def budget_knobs(cls, cfg, num_train: int) -> list:
        from kcd_ray.engine.plan.budget import Knob

        epochs = int(cfg.optim.epochs)
        return [Knob("kcd.rho", 1.0 / max(num_train, 1), 1.0,
                     hint="kcd.interval, kcd.stages or kcd.warmup (fewer full-set epochs before it shrinks)"),
                Knob("kcd.stages", 1, max(1, epochs), integer=True, hint="kcd.rho or kcd.interval")]

    @classmethod
    def check(cls, cfg) -> None:
        k = cfg.kcd
        if k.estep == "offline" and k.value_fn == "kd" and k.value_T is None and is_learned(cfg.distill.temperature):
            raise ConfigError("kcd.value_T: the offline E-step's kd values need a fixed temperature and "
                              "distill.temperature.schedule=ctkd learns it during training; set kcd.value_T")

    @classmethod
    def scores_with_teacher_offline(cls, cfg) -> bool:
        return cfg.kcd.estep == "offline" and needs_teacher(cfg.kcd.value_fn)

    def kept_set(self) -> Optional[np.ndarray]:
        return self.state.kept if self.state.version else None

    def pop_compute_counts(self) -> dict:
        """Extra forward passes for the compute ledger: the offline E-step's student forwards, the teacher forwards
        it ran and the teacher outputs it used (a cache serves some of them)."""
        n, self._offline_passes = self._offline_passes, 0
        t, self._offline_teacher = self._offline_teacher, 0
        teacher = getattr(self.value_fn, "needs_teacher", False)
        return {"student_forward_only": n, "teacher_forward": t if teacher else 0,
                "teacher_output": n if teacher else 0}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)

    def _overlays(self, engine) -> BlendOverlays:
        run_dir = engine.ctx.run_dir
        if not run_dir.remote:
            return BlendOverlays(run_dir.path / "blends", engine.ctx.data_dir)
        return BlendOverlays(run_dir.path / "blends", engine.ctx.data_dir,
                             remote=storage.join(run_dir.remote, "blends"), sync=lambda: run_dir.sync_up("blends"))

    def _mask_path(self, engine, version):
        return engine.ctx.run_dir.sub("masks", f"mask_v{version:03d}.parquet")

    # ------------------------------------------------------------------ hooks
    def before_run(self, engine, start_epoch: int) -> None:
        """After a resume: the checkpoint's blends must be intact (named now, not from inside a Ray Data task)."""
        if engine.ctx.is_chief and self.state.version > 0:
            self._overlay = self._overlays(engine).manifest(self.state.version, check=True)

    def data_selection(self, engine) -> Optional[Selection]:
        if self.state.version == 0:
            return None
        return Selection(kept=self.state.kept, overlay=self._overlay)

    def before_epoch(self, engine, epoch: int) -> None:
        t0 = time.perf_counter()
        self._T, self._epoch = engine.parts.temperature(epoch), epoch
        self._mstep_s = self._estep_s = 0.0
        if not self.online and self.state.schedule.is_condense_epoch(epoch) and epoch > self.state.last_condense_epoch:
            self._offline_estep(engine, epoch)
            self._estep_s = time.perf_counter() - t0
        universe = self._universe(engine)
        result = self.state.maybe_condense(epoch) if universe is None else self.state.maybe_condense(epoch, universe)
        if result is not None and engine.ctx.is_chief:
            self._write(engine, result)
        self._mstep_s = time.perf_counter() - t0 - self._estep_s

    def _universe(self, engine) -> Optional[np.ndarray]:
        """The samples a curriculum lets this epoch train on (hooks with ``universe(engine)``, e.g. ED's active
        groups): the M-step condenses within them. None: no curriculum (all N samples)."""
        out = None
        for h in engine.hooks:
            u = h.universe(engine) if h is not self else None
            if u is not None:
                out = u.copy() if out is None else out & u
        return out

    def after_step(self, engine, batch: dict, output) -> None:
        if not self.online:
            return
        ctx = make_context(batch["sample_id_cpu"], self._epoch, self.cfg.seed, self._T, self.cfg.value_T)
        zt = None if output.teacher_logits is None else output.teacher_logits.detach()
        self._values.append(self.value_fn(output.logits.detach(), zt, batch["label"], ctx))
        self._ids.append(batch["sample_id_cpu"])

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        t0 = time.perf_counter()
        if self.online:
            ids, vals = self._gather_online()
            if engine.ctx.is_chief and (self.record_values or self.state.schedule.is_condense_epoch(epoch + 1)):
                write_value_table(engine.ctx.run_dir, epoch, ids, vals, source="online")
        self._estep_s += time.perf_counter() - t0
        row.update(kept_fraction=self.state.k / self.state.num_samples, stage=self.state.stage,
                   estep_seconds=self._estep_s, mstep_seconds=self._mstep_s)

    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        """Keep the blend versions the kept checkpoints reference (a checkpoint's version is its row's stage:
        one version per condensation), so a fallback to an older intact checkpoint still finds its blends."""
        if engine.ctx.is_chief:
            kept = engine.history[-max(1, engine.cfg.run.checkpoints_to_keep):]
            self._overlays(engine).prune(keep_versions=sorted({r["stage"] for r in kept} | {self.state.version}))

    def end_run(self, engine, summary) -> None:
        if engine.ctx.is_chief:
            self.state.write_mask(engine.ctx.run_dir.sub("masks", "mask_final.parquet"))
            # A finished run keeps only the blends its final checkpoint references.
            self._overlays(engine).prune(keep_versions=[self.state.version])

    # ------------------------------------------------------------------ E-step / M-step
    def _gather_online(self) -> tuple[np.ndarray, np.ndarray]:
        """All-gather (ids, values) of this epoch from every rank and fold them into the accumulator."""
        ids, vals = D.gather_per_sample(self._ids, self._values)
        self._ids, self._values = [], []
        if len(ids):
            self.state.observe(ids, vals)
            self.state.end_epoch()
        return ids, vals

    def _offline_estep(self, engine, epoch: int) -> None:
        """Rank 0 scores all N samples (condensed-away ones too); every rank folds the same table in."""
        table = None
        if engine.ctx.is_chief:
            student = {k: v.detach().cpu() for k, v in engine.distiller.student.state_dict().items()}
            ids, vals = engine.services.score_offline(student, epoch)
            self._offline_passes += len(ids)
            cache = getattr(engine.distiller, "teacher_cache", None)
            # With the cache's un-augmented unit only blended rows (images it never saw) go through the teacher.
            cached = cache is not None and cache.plain
            self._offline_teacher += int((self._overlay or {}).get("num_ids", 0)) if cached else len(ids)
            write_value_table(engine.ctx.run_dir, epoch, ids, vals, source="offline")
            table = (ids, vals)
        ids, vals = D.broadcast_object(table)
        if len(ids) != self.state.num_samples:
            raise ValueError(f"offline E-step at epoch {epoch}: {len(ids)} values for {self.state.num_samples} "
                             "training samples")
        self.state.observe(ids, vals)
        self.state.end_epoch()

    def _write(self, engine, result) -> None:
        """The M-step's files (blends, mask); the engine publishes the new selection before the epoch's data."""
        overlays = self._overlays(engine)
        overlay = overlays.manifest(result.version - 1)
        if len(result.tail_ids):
            overlay = overlays.write(result.version, result.tail_ids, result.lost_ids, result.weights)
        self._overlay = overlay
        self.state.write_mask(self._mask_path(engine, result.version))
        if engine.ctx.verbose:
            s = self.state
            say(f"[kcd_ray] condensation v{result.version} (stage {result.stage}): kept {len(s.kept_ids())}/"
                f"{s.num_samples} ({100 * (s.k / s.num_samples):.1f}%), {len(result.tail_ids)} summary blends")

