"""The Ray Train per-worker loop, shared by teacher training (`ce`) and distillation (`kd`, ...).

Each epoch: [M-step if scheduled] -> train on this worker's shard of the kept set, recording the online
E-step values -> gather values by sample id across workers -> evaluate -> checkpoint + report.
Every rank holds an identical KCDState (it sees the same gathered values), so the M-step is deterministic
everywhere; rank 0 alone writes the mask, the blends and the files.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from kcd_ray.config import config_from_dict
from kcd_ray.data.pipeline import iter_train_batches
from kcd_ray.models import save_model
from kcd_ray.train import estep, mstep
from kcd_ray.train.checkpoint import (latest_local_checkpoint, load_run_checkpoint, restore_into, save_local_checkpoint,
                                      save_run_checkpoint)
from kcd_ray.train.components import build_components
from kcd_ray.train.metrics import Progress, format_epoch, say, summarize, topk_correct
from kcd_ray.train.rundir import RunDir


def _quiet_worker_logs() -> None:
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Child loggers may carry their own level (set by Ray's dictConfig), so quiet each one, not just the parents.
    # (Some of Ray's modules name their logger by file path, e.g. the one that logs every report.)
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("ray.data", "ray.train")) or "/ray/train/" in n or "/ray/data/" in n]
    for name in ["ray.data", "ray.train", *names]:
        logging.getLogger(name).setLevel(logging.WARNING)


def _world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device(cfg) -> torch.device:
    if _distributed() or cfg.scaling.num_workers > 0:
        try:
            return ray.train.torch.get_device()
        except Exception:  # noqa: BLE001 - not inside a Torch worker group
            pass
    want = cfg.scaling.use_gpu
    if want != "false" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _set_threads(cfg) -> None:
    n = cfg.optim.threads or max(1, math.ceil(cfg.scaling.cpus_per_worker if cfg.scaling.num_workers else os.cpu_count() or 1))
    torch.set_num_threads(n)


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _local_checkpoint_dir(run_dir: RunDir):
    # In-process mode (num_workers=0) has no Ray-managed checkpoints: we keep our own.
    return run_dir.path / "local_checkpoint"


class _TestBatches:
    """The test split never changes: keep a small one in memory after the first pass instead of paying
    Ray Data's per-execution start-up every epoch (large splits are streamed every time)."""

    MAX_CACHE_BYTES = 256 * 2**20

    def __init__(self, shard, batch_size: int):
        self.shard, self.batch_size, self.cache = shard, batch_size, None

    def __call__(self):
        if self.cache is not None:
            return iter(self.cache)
        return self._first_pass()

    def _first_pass(self):
        kept, size = [], 0
        for b in self.shard.iter_torch_batches(batch_size=self.batch_size):
            if kept is not None:
                size += b["image"].numel() * b["image"].element_size()
                kept = kept + [b] if size <= self.MAX_CACHE_BYTES else None
            yield b
        self.cache = kept


def evaluate(model, loader_iter, device, rank: int, world: int, amp_ctx) -> dict:
    """Exact test accuracy: the unsplit test set, each rank doing every world-th batch, counts all-reduced."""
    model.eval()
    correct1 = correct5 = total = loss_sum = 0.0
    with torch.no_grad():
        for i, batch in enumerate(loader_iter):
            if i % world != rank:
                continue
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            with amp_ctx:
                logits = model.student(x)
            loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            c1, c5 = topk_correct(logits, y)
            correct1 += c1
            correct5 += c5
            total += y.numel()
    c1, c5, n, ls = _all_sum([correct1, correct5, total, loss_sum], device)
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "val_loss": ls / max(n, 1), "val_samples": int(n)}


def _init_stage(model, raw, train_shard, cfg, device, amp_ctx, verbose: bool) -> None:
    """Two-stage methods (AB, FT, FSP): train their connectors on the full data set before distillation."""
    n = raw.init_stage_epochs() if hasattr(raw, "init_stage_epochs") else 0
    if not n:
        return
    params = list(raw.init_stage_parameters())
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    model.train()
    for e in range(n):
        total, count = 0.0, 0
        for batch in iter_train_batches(train_shard, cfg.optim.batch_size, epoch=e, seed=cfg.optim.seed):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("image", "label", "sample_id")}
            with amp_ctx:
                out = model(batch, T=1.0, epoch=0, init_stage=True)
                loss = sum(out.losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * batch["label"].numel()
            count += batch["label"].numel()
        if verbose:
            say(f"[kcd_ray] init stage ({cfg.distill.method}) {e + 1}/{n}: loss {total / max(count, 1):.4f}")


def _maybe_inject_failure(config: dict, run_dir: RunDir, epoch: int, rank: int) -> None:
    """Fault-injection hook for tests and drills: kill this worker process once, after epoch `fail_at_epoch`."""
    if config.get("fail_at_epoch") != epoch or rank != config.get("fail_rank", 0):
        return
    marker = run_dir.path / f"injected_failure_epoch_{epoch}"
    if marker.exists():
        return
    marker.write_text("killed\n")
    if config.get("fail_mode", "exit") == "raise":
        raise RuntimeError(f"injected failure after epoch {epoch}")
    os._exit(1)  # a real crash: no exception handling, no cleanup


def train_loop_per_worker(config: dict) -> dict | None:
    cfg = config_from_dict(config["cfg"])
    _quiet_worker_logs()
    kind, run_dir, data_dir = config["kind"], RunDir(config["run_dir"]), config["data_dir"]
    rank, world = _world()
    torch.manual_seed(cfg.optim.seed + rank)
    _set_threads(cfg)
    device = _device(cfg)
    c = build_components(cfg, kind, data_dir, device, distributed=_distributed())
    model, optimizer, scheduler, scaler = c.model, c.optimizer, c.scheduler, c.scaler
    raw = c.distiller  # the unwrapped distiller (model may be its DDP wrapper)
    kcd = c.kcd_state
    verbose = cfg.run.verbose > 0 and rank == 0

    history: list[dict] = []
    start_epoch, passes, wall_offset = 0, 0, 0.0
    ckpt = ray.train.get_checkpoint()
    source = None
    if ckpt is not None:
        source = ckpt.to_directory()
    elif world == 1 and (local := latest_local_checkpoint(_local_checkpoint_dir(run_dir))) is not None:
        source = str(local)
    if source is not None:
        state = load_run_checkpoint(source)
        run = restore_into(state, distiller=raw, optimizer=optimizer, scheduler=scheduler, scaler=scaler, kcd_state=kcd, source=source)
        start_epoch, passes, wall_offset, history = run["epoch"] + 1, run["sample_passes"], run["wall_seconds"], run["history"]
        if verbose:
            say(f"[kcd_ray] resumed from {source} at epoch {start_epoch}")
        if rank == 0:
            run_dir.write_metrics(history)
    if kcd is not None and rank == 0:
        mstep.republish(kcd, config, run_dir)  # a restarted driver/actor starts at version 0
    _barrier()

    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    epochs = cfg.optim.epochs
    best = max((m["top1"] for m in history), default=0.0)
    t_run = time.perf_counter()
    amp_ctx = c.amp_ctx

    if start_epoch == 0:
        _init_stage(model, raw, train_shard, cfg, device, amp_ctx, verbose)

    test_batches = _TestBatches(test_shard, cfg.optim.eval_batch_size)
    last_ev = None

    for epoch in range(start_epoch, epochs):
        t_epoch = time.perf_counter()
        # ---- M-step (at the start of a condensation epoch) ----
        mstep_s = 0.0
        if kcd is not None:
            t_m = time.perf_counter()
            if cfg.kcd.estep == "offline" and kcd.schedule.is_condense_epoch(epoch):
                estep.offline_estep(kcd, raw, cfg, config, run_dir, epoch, rank, device)
            result = kcd.maybe_condense(epoch)
            if result is not None and rank == 0:
                mstep.apply_condensation(kcd, result, config, run_dir, verbose)
            _barrier()  # nobody iterates the next epoch before the new mask is published
            mstep_s = time.perf_counter() - t_m

        T = c.temperature(epoch)
        model.train()
        prog = Progress(f"[kcd_ray] epoch {epoch + 1}/{epochs}", enabled=verbose, every_s=30.0)
        loss_sums: dict[str, float] = {}
        ids_seen, values_seen = [], []
        steps = skipped = 0
        estep_s = 0.0
        data_wait = 0.0
        t_wait = time.perf_counter()
        for batch in iter_train_batches(train_shard, cfg.optim.batch_size, epoch=epoch, seed=cfg.optim.seed,
                                        shuffle_buffer=cfg.data.shuffle_buffer):
            data_wait += time.perf_counter() - t_wait
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("image", "label", "sample_id")}
            with amp_ctx:
                out = model(batch, T=T, epoch=epoch)
                loss = sum(out.losses.values())
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:  # the grad scaler already skips non-finite steps
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                # One NaN/inf gradient (e.g. SVD-based losses on degenerate features) would poison the weights
                # for good: skip that step, count it, and fail loudly if it keeps happening.
                gnorm = torch.nn.utils.clip_grad_norm_(c.params, max_norm=float("inf"))
                if torch.isfinite(gnorm):
                    optimizer.step()
                else:
                    skipped += 1
            for k, v in out.losses.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v.detach()) * batch["label"].numel()
            ids_seen.append(batch["sample_id"].detach().cpu())
            if kcd is not None and cfg.kcd.estep == "online":
                t_e = time.perf_counter()
                values_seen.append(estep.instant_values(cfg.kcd.value_fn, c.value_fn, out, batch, epoch, cfg.kcd.seed))
                estep_s += time.perf_counter() - t_e
            steps += 1
            prog.step(batch["label"].numel(), float(loss.detach()))
            t_wait = time.perf_counter()
        scheduler.step()
        if steps and skipped > max(2, steps // 10):
            terms = ", ".join(f"{k}={loss_sums[k]:.3g}" for k in sorted(loss_sums))
            raise FloatingPointError(
                f"epoch {epoch}: {skipped} of {steps} steps had non-finite gradients ({terms}); lower optim.lr or "
                f"distill.beta for method {cfg.distill.method!r}")

        # ---- online E-step: aggregate this epoch's values by sample id over all workers ----
        local_n = prog.samples
        t_e = time.perf_counter()
        if config.get("record_ids"):  # test/debug aid: which ids this rank trained on this epoch
            np.save(run_dir.sub("ids", f"e{epoch:04d}_r{rank}.npy"), torch.cat(ids_seen).numpy() if ids_seen else np.zeros(0, np.int64))
        if kcd is not None and cfg.kcd.estep == "online":
            seen = estep.gather_online_values(kcd, ids_seen, values_seen, world)
            if rank == 0 and (kcd.schedule.is_condense_epoch(epoch + 1) or config.get("record_ids")):
                estep.write_value_table(run_dir, epoch, *seen, source="online")
        estep_s += time.perf_counter() - t_e
        n_seen, *sums = _all_sum([prog.samples] + [loss_sums.get(k, 0.0) for k in sorted(loss_sums)], device)
        passes += int(n_seen)
        train_s = time.perf_counter() - t_epoch

        evaluated = last_ev is None or (epoch + 1) % cfg.optim.eval_every == 0 or epoch == epochs - 1
        if evaluated:
            last_ev = evaluate(raw, test_batches(), device, rank, world, amp_ctx)
        ev = dict(last_ev)  # optim.eval_every > 1: skipped epochs carry the last evaluation
        best = max(best, ev["top1"])
        wall = wall_offset + (time.perf_counter() - t_run)
        m = {
            "epoch": epoch, "epochs": epochs, "kind": kind, "kcd_enabled": kcd is not None and cfg.kcd.enabled,
            "train_loss": sum(sums) / max(n_seen, 1),
            **{f"loss_{k}": s / max(n_seen, 1) for k, s in zip(sorted(loss_sums), sums)},
            **ev, "best_top1": best,
            "kept_fraction": (kcd.k / kcd.num_samples) if kcd is not None else 1.0,
            "stage": kcd.stage if kcd is not None else 0,
            "samples_seen": int(n_seen), "sample_passes": passes,
            "compute_ratio": passes / (c.num_train * (epoch + 1)),
            "T": T if kind == "distill" else None, "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - t_epoch, "train_seconds": train_s,
            "images_per_s": n_seen / max(train_s, 1e-9), "estep_seconds": estep_s, "mstep_seconds": mstep_s, "data_wait_seconds": data_wait,
            "wall_seconds": wall, "world_size": world, "local_samples": int(local_n),
            "skipped_steps": skipped, "evaluated": evaluated,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
        }
        history.append(m)
        run_state = {"epoch": epoch, "sample_passes": passes, "wall_seconds": wall, "history": history, "last_top1": ev["top1"]}
        ckpt_obj = None
        if rank == 0:
            run_dir.write_metrics(history)
            if evaluated and ev["top1"] >= best:
                save_model(run_dir.path / "best_model.pt", raw.student, extra={"epoch": epoch, "top1": ev["top1"]})
            if verbose:
                say("[kcd_ray] " + format_epoch(m))
            parts = dict(distiller=raw, optimizer=optimizer, scheduler=scheduler, scaler=scaler, kcd_state=kcd,
                         run_state=run_state, config=config["cfg"])
            if cfg.scaling.num_workers:
                ckpt_dir = tempfile.mkdtemp(prefix="kcd_ckpt_")
                save_run_checkpoint(ckpt_dir, **parts)
                ckpt_obj = ray.train.Checkpoint.from_directory(ckpt_dir)
            else:
                save_local_checkpoint(_local_checkpoint_dir(run_dir), **parts)
        # Node ids of every rank (multi-node placement is checked from these).
        report = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and v is not None}
        ray.train.report(report, checkpoint=ckpt_obj, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
        if ckpt_obj is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # already persisted to storage by report()
        if epoch == start_epoch:
            run_dir.write_text(f"nodes/rank_{rank}.txt", m["node_id"])
        _maybe_inject_failure(config, run_dir, epoch, rank)

    if rank != 0:
        return None
    summary = summarize(history, kind=kind, kcd_enabled=kcd is not None and cfg.kcd.enabled, num_train=c.num_train,
                        epochs=epochs, run_dir=str(run_dir.path), config=config["cfg"])
    save_model(run_dir.path / "final_model.pt", raw.student, extra={"epoch": epochs - 1, "top1": history[-1]["top1"]})
    run_dir.write_json("summary.json", summary)
    if kcd is not None:
        mstep.write_final_mask(kcd, run_dir)
    return summary
