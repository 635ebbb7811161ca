"""Test and drill hooks: never in a production config; tests pass them to ``fit(..., hooks=[...])``."""

from __future__ import annotations

import os

import numpy as np
import torch

from kcd_ray.engine.hooks import HOOKS, Hook


@HOOKS.register("fail")
class FailAfterEpoch(Hook):
    """Kill this worker once, after epoch ``epoch``'s checkpoint: ``mode="exit"`` is a real crash (no cleanup),
    ``"raise"`` an exception. A marker file in the run folder makes it fire once across restarts."""

    def __init__(self, epoch: int, rank: int = 0, mode: str = "exit"):
        if mode not in ("exit", "raise"):
            raise ValueError(f"fail hook: mode {mode!r} is not one of: exit, raise")
        self.epoch, self.rank, self.mode = int(epoch), int(rank), mode

    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        if epoch != self.epoch or engine.ctx.rank != self.rank:
            return
        marker = engine.ctx.run_dir.path / f"injected_failure_epoch_{epoch}"
        if marker.exists():
            return
        marker.write_text("killed\n")
        if self.mode == "raise":
            raise RuntimeError(f"injected failure after epoch {epoch}")
        os._exit(1)  # a real crash: no exception handling, no cleanup


@HOOKS.register("pace")
class PaceWhileShrunk(Hook):
    """Sleep ``seconds`` after each epoch run by fewer than ``below`` workers: an elastic drill's lost-node phase
    then lasts long enough for the node to come back and the worker group to grow (on any machine speed)."""

    def __init__(self, below: int, seconds: float):
        self.below, self.seconds = int(below), float(seconds)

    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        if engine.ctx.world < self.below:
            import time

            time.sleep(self.seconds)


@HOOKS.register("record_ids")
class RecordIds(Hook):
    """Write which sample ids this rank trained on in each epoch (``ids/e<epoch>_r<rank>.npy``), and make the
    condenser write every epoch's value table."""

    def __init__(self):
        self._ids: list[torch.Tensor] = []

    def before_run(self, engine, start_epoch: int) -> None:
        kcd = engine.hook("kcd")
        if kcd is not None:
            kcd.record_values = True

    def after_step(self, engine, batch: dict, output) -> None:
        self._ids.append(batch["sample_id_cpu"])

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        ids = torch.cat(self._ids).numpy() if self._ids else np.zeros(0, np.int64)
        self._ids = []
        np.save(engine.ctx.run_dir.sub("ids", f"e{epoch:04d}_r{engine.ctx.rank}.npy"), ids)


@HOOKS.register("record_selection")
class RecordSelection(Hook):
    """Write, per rank and epoch, the data-selection strategy's state after the epoch
    (``selection/e<epoch>_r<rank>.npz``: ``kept`` bool[N], and InfoBatch's ``weights`` and ``scores``), so a test can
    check that every rank holds the same."""

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        from kcd_ray.engine.selection import SelectionStrategy

        hook = next((h for h in engine.hooks if isinstance(h, SelectionStrategy)), None)
        if hook is None:
            return
        kept = hook.kept_set()
        arrays = {"kept": np.ones(engine.parts.num_train, bool) if kept is None else np.asarray(kept, bool),
                  **{k: np.asarray(v) for k, v in hook.state_arrays().items()}}
        np.savez(engine.ctx.run_dir.sub("selection", f"e{epoch:04d}_r{engine.ctx.rank}.npz"), **arrays)
