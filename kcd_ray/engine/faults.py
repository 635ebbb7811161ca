"""Test and drill hooks: never in a production config; tests pass them to ``fit(..., hooks=[...])``."""

from __future__ import annotations

import json
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
    """Write, per rank and epoch, the data-selection strategy's state after the epoch (``selection/e<epoch>_r<rank>.npz``:
    ``kept`` bool[N], and InfoBatch's ``weights`` and ``scores``), so a test can check that every rank holds the same."""

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        from kcd_ray.engine.selection import STRATEGY_HOOK_NAMES

        hook = next((h for h in engine.hooks if h.name in STRATEGY_HOOK_NAMES), None)
        if hook is None:
            return
        n = engine.parts.num_train
        kept = getattr(hook, "kept", None)
        if kept is None and hasattr(hook, "state"):  # KCD
            kept = hook.state.kept if hook.state.version else None
        arrays = {"kept": np.ones(n, bool) if kept is None else np.asarray(kept, bool)}
        for name in ("weights", "scores"):
            if getattr(hook, name, None) is not None:
                arrays[name] = np.asarray(getattr(hook, name))
        np.savez(engine.ctx.run_dir.sub("selection", f"e{epoch:04d}_r{engine.ctx.rank}.npz"), **arrays)


@HOOKS.register("plain_epoch")
class PlainEpochBeside(Hook):
    """Benchmark drill (``bench/train_throughput.py --paired``): before each epoch, rank 0 trains one epoch of a
    plain PyTorch loop (:class:`kcd_ray.engine.baseline.PlainLoop`: same model, batch and augmentation, its own
    weights and random streams) in this worker process, and appends its img/s to ``plain_epochs.jsonl`` in the
    run folder. The engine leaves ``before_epoch`` time out of an epoch's ``train_seconds``."""

    def __init__(self):
        self.loop = None

    def before_epoch(self, engine, epoch: int) -> None:
        if not engine.ctx.is_chief:
            return
        if self.loop is None:
            from kcd_ray.engine.baseline import PlainLoop

            self.loop = PlainLoop(engine.ctx.data_dir, engine.cfg.model, engine.cfg.optim.batch_size,
                                  seed=engine.cfg.optim.seed, model_kwargs=engine.cfg.model_kwargs)
        line = json.dumps({"epoch": epoch, "images_per_s": self.loop.epoch()})
        with open(engine.ctx.run_dir.path / "plain_epochs.jsonl", "a") as f:
            f.write(line + "\n")
