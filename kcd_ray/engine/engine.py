"""The training engine: the step, the epoch, evaluation, the metrics row and the run checkpoint.

Plain torch: the engine is driven by two callables that yield batches (``{"image", "label", "sample_id"}``
CPU tensors), so a unit test feeds it a Python list and the Ray worker feeds it its Ray Data shard. Every
rank runs the same engine; collectives go through ``kcd_ray.engine.distributed`` (no-ops in one process).

GPU discipline: the step never reads a device value on the host. Loss sums, the skipped-step count and the
online E-step values stay on the device and are read once per epoch (the progress line reads the loss at
most every ``PROGRESS_EVERY_S`` seconds). Non-finite steps are skipped on the device: a fused optimiser gets
the step's ``found_inf`` flag (as AMP's grad scaler hands it), so no ``if isfinite(...)`` on the host.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from kcd_ray.config import to_dict
from kcd_ray.engine import distributed as D
from kcd_ray.engine.build import Components, build_scheduler
from kcd_ray.engine.checkpoint import load_run_checkpoint, restore_into, save_run_checkpoint
from kcd_ray.engine.context import RunContext, Services
from kcd_ray.engine.hooks import Hook
from kcd_ray.engine.metrics import Progress, say, summarize
from kcd_ray.engine.resume import read_history, trained_under
from kcd_ray.engine.selection.base import strategy_class

Batches = Callable[[int], Iterable[dict]]
PROGRESS_EVERY_S = 30.0
BATCH_KEYS = ("image", "label", "sample_id", "t_logits", "t_feat", "t_missing")  # t_*: teacher-output cache
# The numeric columns of every metrics row the engine writes itself (hooks declare theirs: Hook.columns), and the
# prefix of one column per loss term.
ENGINE_COLUMNS = ("epoch", "epochs", "train_loss", "top1", "top5", "test_loss", "test_samples", "best_top1",
                  "kept_fraction", "samples_seen", "sample_passes", "T", "lr", "train_seconds", "images_per_s",
                  "data_wait_seconds", "hook_seconds", "world_size", "local_samples", "skipped_steps",
                  "selected_epoch", "epoch_seconds", "wall_seconds")
# ... and with a validation split (data.val_fraction > 0), the same figures on it
VAL_COLUMNS = ("val_top1", "val_top5", "val_loss", "val_samples", "best_val_top1")
SELECT_MODES = {"val_top1": "max", "val_top5": "max", "val_loss": "min", "top1": "max", "top5": "max",
                "test_loss": "min"}
LOSS_PREFIX = "loss_"


def grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Per k, the number of samples whose label is among the top-k predictions, as a device tensor."""
    maxk = min(max(ks), logits.shape[1])
    hit = logits.topk(maxk, dim=1).indices.eq(labels.view(-1, 1))
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Engine:
    def __init__(self, ctx: RunContext, parts: Components, hooks: list[Hook], services: Services,
                 device: torch.device):
        self.ctx, self.parts, self.hooks, self.services, self.device = ctx, parts, list(hooks), services, device
        self.cfg = ctx.cfg
        self.distiller, self.model = parts.distiller, parts.model  # model: the DDP wrapper when distributed
        self.optimizer, self.scheduler, self.scaler = parts.optimizer, parts.scheduler, parts.scaler
        self.start_epoch, self.sample_passes, self.wall_offset = 0, 0, 0.0
        self.fallback_note = ""  # why the resume started from an older checkpoint than the newest ("" otherwise)
        self.history: list[dict] = []
        self.train_batches: Optional[Batches] = None
        self.test_batches: Optional[Callable[[], Iterable[dict]]] = None
        self.val_batches: Optional[Callable[[], Iterable[dict]]] = None
        self.select = ctx.plan.select if ctx.plan is not None else "top1"  # the metric that picks the best epoch
        self._last_eval: Optional[dict] = None
        self._published, self._selection_version = (None, json.dumps(None)), 0  # nothing published: all samples
        self._served = parts.num_train  # samples the published selection serves (the kept_fraction column)
        # Per-step hook points are called only on the hooks that override them (nothing to pay otherwise).
        self._batch_hooks = [h for h in self.hooks if type(h).before_step is not Hook.before_step]
        self._loss_hooks = [h for h in self.hooks if type(h).adjust_loss is not Hook.adjust_loss]
        names = [h.name for h in self.hooks if h.name]
        if len(names) != len(set(names)):
            raise ValueError(f"hooks: duplicate names {names}")

    # ------------------------------------------------------------------ hooks and data
    def hook(self, name: str) -> Optional[Hook]:
        return next((h for h in self.hooks if h.name == name), None)

    def _each(self, method: str, *args) -> list:
        return [getattr(h, method)(self, *args) for h in self.hooks]

    def begin_data_epoch(self, epoch: int) -> None:
        """Tell the data pipeline what it serves next: the samples every hook's selection keeps (published when
        it changed) and the epoch (its shuffle and augmentation are seeded by it). Rank 0, then a barrier."""
        if self.ctx.is_chief:
            self._publish_selection()
            self.services.set_data_epoch(epoch)
        D.barrier()

    def _publish_selection(self) -> None:
        kept, overlay = None, None
        for sel in (h.data_selection(self) for h in self.hooks):
            if sel is None:
                continue
            if sel.kept is not None:
                kept = sel.kept.copy() if kept is None else kept & sel.kept
            overlay = sel.overlay if sel.overlay is not None else overlay
        key = (None if kept is None else hash(np.packbits(kept).tobytes()), json.dumps(overlay, sort_keys=True))
        if key == self._published:
            return
        self._published = key
        self._selection_version += 1
        ids = np.arange(self.parts.num_train, dtype=np.int64) if kept is None else np.flatnonzero(kept)
        self._served = len(ids)
        self.services.publish_mask(self._selection_version, ids, overlay)

    def to_device(self, batch: dict) -> dict:
        out = {k: batch[k].to(self.device, non_blocking=True) for k in BATCH_KEYS if k in batch}
        out["sample_id_cpu"] = batch["sample_id"]  # ids for host-side bookkeeping, without a device read
        if "t_missing" in batch:  # which rows need the teacher in the loop, readable without a device sync
            out["t_missing_cpu"] = batch["t_missing"]
        return out

    # ------------------------------------------------------------------ resume
    def restore(self, source) -> None:
        """Load a run checkpoint folder (model, optimiser, scheduler, scaler, run state, hook states)."""
        state = load_run_checkpoint(source)
        run = restore_into(state, distiller=self.distiller, optimizer=self.optimizer, scheduler=self.scheduler,
                           scaler=self.scaler, source=str(source))
        states = dict(state.get("hooks") or {})
        for h in self.hooks:
            if h.name and states.get(h.name) is not None:
                h.load_state_dict(states[h.name])
        rng = run.get("rng") or []
        if len(rng) == self.ctx.world:  # same world size: each rank continues its own streams
            set_rng_state(rng[self.ctx.rank])
        self.start_epoch = run["epoch"] + 1
        self.sample_passes, self.wall_offset, self.history = run["sample_passes"], run["wall_seconds"], run["history"]
        old_epochs = (state.get("config") or {}).get("optim", {}).get("epochs", self.cfg.optim.epochs)
        if old_epochs != self.cfg.optim.epochs:  # an extended (or shortened) run: the new config's LR schedule
            for g in self.optimizer.param_groups:  # torch's schedulers start from the group's current rate
                g["lr"] = g.get("initial_lr", g["lr"])
            self.scheduler = self.parts.scheduler = build_scheduler(self.optimizer, self.cfg.optim)
            with warnings.catch_warnings():  # "step() before optimizer.step()": fast-forwarding, on purpose
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(self.start_epoch):
                    self.scheduler.step()
        if self.ctx.verbose:
            say(f"[kcd_ray] resumed from {source} at epoch {self.start_epoch}")

    # ------------------------------------------------------------------ the step
    def step(self, batch: dict, T: float, epoch: int):
        with self.parts.amp_ctx:
            out = self.model(batch, T=T, epoch=epoch)
            loss = sum(out.losses.values())
            for h in self._loss_hooks:
                loss = h.adjust_loss(self, batch, out, loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            finite = torch.isfinite(grad_norm(self.parts.params))
            self.scaler.step(self.optimizer)  # skips non-finite steps itself
            self.scaler.update()
        else:
            loss.backward()
            # One NaN/inf gradient (e.g. SVD-based losses on degenerate features) would poison the weights for
            # good: skip that step. A fused optimiser skips on the device; others need one host read.
            finite = torch.isfinite(grad_norm(self.parts.params))
            if self.parts.fused:
                self.optimizer.found_inf = (~finite).float()
                self.optimizer.step()
            elif bool(finite):
                self.optimizer.step()
        return out, loss.detach(), finite

    def train_epoch(self, epoch: int, T: float) -> dict:
        self.model.train()
        prog = Progress(f"[kcd_ray] epoch {epoch + 1}/{self.cfg.optim.epochs}", enabled=self.ctx.verbose,
                        every_s=PROGRESS_EVERY_S)
        sums: dict[str, torch.Tensor] = {}
        skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        steps, data_wait = 0, 0.0
        t_wait = time.perf_counter()
        for raw in self.train_batches(epoch):
            data_wait += time.perf_counter() - t_wait
            batch = self.to_device(raw)
            for h in self._batch_hooks:
                batch = h.before_step(self, batch) or batch
            out, loss, finite = self.step(batch, T, epoch)
            n = batch["label"].shape[0]
            for k, v in out.losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * n
            skipped += (~finite).long()
            steps += 1
            self._each("after_step", batch, out)
            prog.step(n, loss)
            t_wait = time.perf_counter()
        self.scheduler.step()
        return {"sums": sums, "skipped": skipped, "steps": steps, "local_samples": prog.samples,
                "data_wait_seconds": data_wait}

    def _check_finite(self, epoch: int, skipped: int, steps: int, terms: dict) -> None:
        if steps and skipped > max(2, steps // 10):
            text = ", ".join(f"{k}={terms[k]:.3g}" for k in sorted(terms))
            raise FloatingPointError(
                f"epoch {epoch}: {skipped} of {steps} steps had non-finite gradients ({text}); lower optim.lr or "
                f"distill.beta for method {self.cfg.distill.method!r}")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batches: Iterable[dict], split: str = "test") -> dict:
        """Exact accuracy on an unsplit evaluation set (``test``: ``top1``, ``top5``, ``test_loss``, ``test_samples``;
        ``val``: ``val_top1`` ...), each rank doing every world-th batch, counts all-reduced."""
        self.distiller.eval()
        acc = torch.zeros(4, dtype=torch.float64, device=self.device)  # top1, top5, n, loss sum
        rank, world = self.ctx.rank, self.ctx.world
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if i % world != rank:
                    continue
                x = batch["image"].to(self.device, non_blocking=True)
                y = batch["label"].to(self.device, non_blocking=True)
                with self.parts.amp_ctx:
                    logits = self.distiller.student(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
                acc += torch.cat([topk_hits(logits, y).double(), torch.tensor([y.numel()], device=self.device,
                                                                             dtype=torch.float64), loss.double()[None]])
        c1, c5, n, ls = D.all_sum(list(acc), self.device)
        p = "" if split == "test" else f"{split}_"
        return {f"{p}top1": 100.0 * c1 / max(n, 1), f"{p}top5": 100.0 * c5 / max(n, 1),
                f"{split}_loss": ls / max(n, 1), f"{split}_samples": int(n)}

    def _evaluations(self, test_batches, evaluated: bool) -> dict:
        """The epoch's test figures (and validation figures, with a validation split); an epoch skipped by
        ``optim.eval_every`` carries the last evaluation."""
        if evaluated:
            ev = self.evaluate(test_batches())
            if self.val_batches is not None:
                ev.update(self.evaluate(self.val_batches(), "val"))
            self._last_eval = ev
        return dict(self._last_eval)

    def _best(self, ev: dict, epoch: int) -> dict:
        """Running bests: test top-1, validation top-1, and the epoch the selection metric (``run.select``) picks."""
        prev = self.history[-1] if self.history else None
        out = {"best_top1": max([ev["top1"]] + ([prev["best_top1"]] if prev else []))}
        if "val_top1" in ev:
            out["best_val_top1"] = max([ev["val_top1"]] + ([prev["best_val_top1"]] if prev and "best_val_top1" in prev
                                                          else []))
        metric, sign = self.select, (1 if SELECT_MODES.get(self.select, "max") == "max" else -1)
        chosen = epoch
        if prev is not None and prev.get("selected_epoch") is not None:
            old = next((r for r in self.history if r["epoch"] == prev["selected_epoch"]), None)
            if old is not None and metric in old and sign * old[metric] >= sign * ev[metric]:
                chosen = old["epoch"]  # ties keep the earlier epoch
        out["selected_epoch"] = chosen
        return out

    # ------------------------------------------------------------------ one epoch, the run
    def run_epoch(self, epoch: int, test_batches: Callable[[], Iterable[dict]], t_run: float) -> dict:
        t_epoch = time.perf_counter()
        self._each("before_epoch", epoch)
        self.begin_data_epoch(epoch)
        hook_s = time.perf_counter() - t_epoch
        T = self.parts.temperature(epoch)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trains with (the scheduler steps after it)
        tr = self.train_epoch(epoch, T)
        keys = sorted(tr["sums"])
        n_seen, skipped, *sums = D.all_sum([tr["local_samples"], tr["skipped"]] + [tr["sums"][k] for k in keys],
                                           self.device)
        self._check_finite(epoch, int(skipped), tr["steps"], dict(zip(keys, sums)))
        self.sample_passes += int(n_seen)
        train_s = time.perf_counter() - t_epoch - hook_s
        epochs = self.cfg.optim.epochs
        evaluated = (self._last_eval is None or (epoch + 1) % self.cfg.optim.eval_every == 0 or epoch == epochs - 1)
        ev = self._evaluations(test_batches, evaluated)
        row = {
            "epoch": epoch, "epochs": epochs, "kind": self.ctx.kind,
            "train_loss": sum(sums) / max(n_seen, 1),
            **{f"{LOSS_PREFIX}{k}": s / max(n_seen, 1) for k, s in zip(keys, sums)},
            **ev, **self._best(ev, epoch), "kept_fraction": self._served / max(self.parts.num_train, 1),
            "samples_seen": int(n_seen), "sample_passes": self.sample_passes,
            # a learned temperature (ctkd) changed during the epoch: its value at the epoch's end
            "T": self.parts.temperature(epoch) if self.ctx.kind == "distill" else None, "lr": lr,
            "train_seconds": train_s, "images_per_s": n_seen / max(train_s, 1e-9),
            "data_wait_seconds": tr["data_wait_seconds"], "hook_seconds": hook_s,
            "world_size": self.ctx.world, "local_samples": int(tr["local_samples"]),
            "skipped_steps": int(skipped), "evaluated": evaluated,
        }
        self._each("after_epoch", epoch, row)
        row["epoch_seconds"] = time.perf_counter() - t_epoch
        row["wall_seconds"] = self.wall_offset + (time.perf_counter() - t_run)
        self.history.append(row)
        return row

    def checkpoint_writer(self, epoch: int, row: dict, rng: list):
        """A callable that writes this epoch's run checkpoint into a folder (rank 0 only); ``rng``: every
        rank's random-generator states, so a resumed run draws what the uninterrupted one would have."""
        run_state = {"epoch": epoch, "sample_passes": self.sample_passes, "wall_seconds": row["wall_seconds"],
                     "history": self.history, "last_top1": row["top1"], "rng": rng}
        hooks = {h.name: h.state_dict() for h in self.hooks if h.name}
        parts = dict(distiller=self.distiller, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                     run_state=run_state, config=to_dict(self.cfg), hooks=hooks)
        return lambda folder: save_run_checkpoint(folder, **parts)

    def _strategy_info(self) -> dict:
        plan = self.ctx.plan
        return plan.selection.info if plan is not None else strategy_class(self.cfg, self.ctx.kind).info(self.cfg)

    def _planned(self) -> dict:
        """The plan's compute figures for the summary: planned_compute_ratio, and a budget with what it set."""
        plan = self.ctx.plan
        if plan is None:
            return {}
        sel = plan.selection
        budget = {"budget": sel.budget, "budget_resolved": dict(sel.resolved)} if sel.budget is not None else {}
        return {"planned_compute_ratio": plan.compute.planned_compute_ratio, **budget}

    def _provenance(self) -> dict:
        """What trained the final model: which epochs under which config (``config`` is the last segment's), and
        whether the teacher ran in the loop (and why, when a cache was asked for and not used)."""
        out = {"trained_under": trained_under(read_history(self.ctx.run_dir), self.cfg.optim.epochs)}
        plan = self.ctx.plan
        if plan is not None and self.ctx.kind == "distill":
            out.update(teacher_in_loop=plan.teacher.in_loop, teacher_note=plan.teacher.note)
        return out

    def run(self, train_batches: Batches, test_batches: Callable[[], Iterable[dict]],
            val_batches: Optional[Callable[[], Iterable[dict]]] = None) -> Optional[dict]:
        """Train from ``start_epoch`` to the end; rank 0 returns the summary, other ranks None. ``val_batches``: the
        validation split's batches, when the data set has one (evaluated with the test split every epoch)."""
        self.train_batches, self.test_batches, self.val_batches = train_batches, test_batches, val_batches
        self._each("before_run", self.start_epoch)
        t_run = time.perf_counter()
        for epoch in range(self.start_epoch, self.cfg.optim.epochs):
            row = self.run_epoch(epoch, test_batches, t_run)
            report = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) and v is not None}
            rng = D.all_gather_objects(rng_state())
            self.services.report(report, self.checkpoint_writer(epoch, row, rng) if self.ctx.is_chief else None, epoch)
            self._each("after_checkpoint", epoch, row)
        summary = None
        if self.ctx.is_chief and self.history:
            summary = summarize(self.history, kind=self.ctx.kind, num_train=self.parts.num_train,
                                epochs=self.cfg.optim.epochs, run_dir=self.ctx.run_dir.where, config=to_dict(self.cfg),
                                strategy_info=self._strategy_info(), select=self.select, planned=self._planned())
            summary.update(self._provenance())
        self._each("end_run", summary)
        return summary

