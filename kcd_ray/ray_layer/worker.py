"""The Ray Train worker function: build the engine, hand it this worker's shards, report through Ray Train.

This is the only module that calls ``ray.train`` inside a worker. Everything that happens in an epoch lives
in ``kcd_ray.engine``; ``RayServices`` is how the engine's side effects reach Ray (the MaskStore actor, the
offline E-step's Ray Data pass, ``ray.train.report`` with a checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import ray
import ray.train
import numpy as np
import torch

from kcd_ray import storage
from kcd_ray.data import transforms as T
from kcd_ray.data.device_augment import BatchFinisher
from kcd_ray.data.groups import local_label_feeds
from kcd_ray.engine import Engine, Hook, RunContext, assemble_engine
from kcd_ray.engine import distributed as D
from kcd_ray.engine.checkpoint import latest_local_checkpoint, replace_checkpoint
from kcd_ray.engine.metrics import say
from kcd_ray.engine.plan import RunPlan
from kcd_ray.engine.resume import amend_last
from kcd_ray.engine.rundir import RunDir, checkpoint_dir_name, checkpoint_key
from kcd_ray.models import CheckpointError
from kcd_ray.ray_layer import mask_store
from kcd_ray.ray_layer.logs import quiet_ray_data_and_train, quiet_worker_error_echo
from kcd_ray.ray_layer.pipeline import iter_train_batches, split_passes


def local_checkpoint_dir(run_dir: RunDir) -> Path:
    """In-process runs (``num_workers=0``) have no Ray-managed checkpoints: they keep their own here."""
    return run_dir.path / "local_checkpoint"


class RayServices:
    """The engine's side effects through Ray: the MaskStore actor, the offline E-step's Ray Data pass (reading the
    teacher-output cache's un-augmented unit when the plan has one) and ``ray.train.report``."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.in_process = ctx.plan.resources.num_workers == 0
        self.teacher_cache = ctx.plan.cache.to_dict() if ctx.plan.cache is not None else None
        self._taken: Optional[set] = None  # checkpoint folder names in the run (rank 0, read at its first report)

    def publish_mask(self, version, kept_ids, overlay) -> None:
        # replace: after a worker-group restart the store may already hold this version from the lost attempt.
        mask_store.publish_mask(self.ctx.mask_store, version, kept_ids, overlay, replace=True)

    def set_data_epoch(self, epoch: int) -> None:
        mask_store.set_epoch(self.ctx.mask_store, epoch, world=self.ctx.world)

    def score_offline(self, student_state: dict, epoch: int):
        from kcd_ray.ray_layer.scoring import offline_scores

        cfg = self.ctx.cfg
        return offline_scores(self.ctx.data_dir, cfg, student_state, epoch=epoch, mask_store=self.ctx.mask_store,
                              teacher_cache=self.teacher_cache)

    def report(self, metrics: dict, checkpoint, epoch: int) -> None:
        name = self._checkpoint_name(epoch) if checkpoint is not None and not self.in_process else ""
        if self.ctx.is_chief:  # an object store: the epoch's masks, values and blends before its checkpoint
            self.ctx.run_dir.sync_up()
        if checkpoint is None or self.in_process:
            if checkpoint is not None:
                replace_checkpoint(local_checkpoint_dir(self.ctx.run_dir), checkpoint)
            # in-process (maybe inside a Tune trial, where ray.train.report raises): nothing to send
            if not self.in_process:
                ray.train.report(metrics, checkpoint=None)
            return
        folder = tempfile.mkdtemp(prefix="kcd_ckpt_")
        try:
            checkpoint(Path(folder))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # already persisted to storage by report()

    def _checkpoint_name(self, epoch: int) -> str:
        """Rank 0's name for this epoch's checkpoint folder (Ray Train broadcasts rank 0's): never the name of a
        folder already in the run, such as a damaged one of this epoch before a fallback (rundir.CHECKPOINT_PREFIX)."""
        if self._taken is None:
            self._taken = set(self.ctx.run_dir.checkpoint_folders())
        name = checkpoint_dir_name(epoch, self._taken)
        self._taken.add(name)
        return name


class NodeInfo(Hook):
    """Each rank's Ray node id in the metrics row, and in ``nodes/rank_<r>.txt`` (multi-node placement checks)."""

    def after_epoch(self, engine, epoch: int, row: dict) -> None:
        row["node_id"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        if epoch == engine.start_epoch:
            engine.ctx.run_dir.write_text(f"nodes/rank_{engine.ctx.rank}.txt", row["node_id"])


class RunSync(Hook):
    """A run in an object store: rank 0 uploads the run folder's new files once each epoch's files are complete
    (after the checkpoint and the metrics row) and at the end (final model, summary, final mask)."""

    def after_checkpoint(self, engine, epoch: int, row: dict) -> None:
        if engine.ctx.is_chief:
            engine.ctx.run_dir.sync_up()

    def end_run(self, engine, summary) -> None:
        if engine.ctx.is_chief:
            engine.ctx.run_dir.sync_up()


class TestBatches:
    """The test split never changes: keep a small one in memory after the first pass instead of paying
    Ray Data's per-execution start-up every epoch (large splits are streamed every time)."""

    MAX_CACHE_BYTES = 256 * 2**20

    def __init__(self, shard, batch_size: int):
        self.shard, self.batch_size, self.cache = shard, batch_size, None

    def __call__(self):
        return iter(self.cache) if self.cache is not None else self._first_pass()

    def _first_pass(self):
        kept, size = [], 0
        for b in self.shard.iter_torch_batches(batch_size=self.batch_size):
            if kept is not None:
                size += b["image"].numel() * b["image"].element_size()
                kept = kept + [b] if size <= self.MAX_CACHE_BYTES else None
            yield b
        self.cache = kept


def worker_device(plan: RunPlan) -> torch.device:
    if plan.resources.num_workers > 0:
        return ray.train.torch.get_device()
    return torch.device("cuda" if plan.resources.use_gpu == "true" and torch.cuda.is_available() else "cpu")


def _restore(engine: Engine, ctx: RunContext) -> None:
    """Resume from Ray Train's latest checkpoint when it is complete and loads; else from the newest older one
    that does (``_fall_back``); in-process, from the run's own local checkpoint."""
    workers = ctx.plan.resources.num_workers
    ckpt = ray.train.get_checkpoint() if workers else None  # in-process: the local one below
    if ckpt is not None:
        name = Path(ckpt.path).name  # ckpt.path: the folder's name in the store too
        problem = ctx.run_dir.checkpoint_problems().get(name, "not in the run folder")
        if problem is not None:  # half-written or marked damaged: never loaded
            _fall_back(engine, ctx, name, CheckpointError(f"{storage.join(ctx.run_dir.where, name)}: incomplete "
                                                          f"checkpoint ({problem})"))
        else:
            with ckpt.as_directory() as folder:  # the folder in storage itself when it is local: no copy to clean
                try:
                    engine.restore(folder)
                except CheckpointError as e:
                    if ctx.is_chief:
                        ctx.run_dir.mark_damaged(name, str(e))
                    _fall_back(engine, ctx, name, e)
    elif workers and ctx.run_dir.checkpoint_names():
        _restore_unregistered(engine, ctx)
    elif ctx.world == 1 and (local := latest_local_checkpoint(local_checkpoint_dir(ctx.run_dir))) is not None:
        engine.restore(local)
    _record_fallback(engine, ctx)


def _record_fallback(engine: Engine, ctx: RunContext) -> None:
    """A resume that started earlier than the driver planned (a checkpoint that failed to load): history.jsonl's
    start or resume line of this attempt says where training really started."""
    planned = ctx.plan.folder.start_epoch
    if ctx.is_chief and engine.start_epoch < planned:
        amend_last(ctx.run_dir, start_epoch=engine.start_epoch, planned_start_epoch=planned,
                   fallback=engine.fallback_note)


def _restore_unregistered(engine: Engine, ctx: RunContext) -> None:
    """Ray Train restarted the worker group after a crash that came before its controller registered the newest
    checkpoint (``ray.train.report`` had written it to storage): resume from the newest complete one in the run
    folder instead of starting over, as a new ``fit`` on the same folder would."""
    for name, folder in _older_checkpoints(ctx, None):
        try:
            engine.restore(folder)
            return
        except CheckpointError as e:
            if ctx.is_chief:
                ctx.run_dir.mark_damaged(name, str(e))
            continue


def _fall_back(engine: Engine, ctx: RunContext, damaged: str, error: CheckpointError) -> None:
    """The newest checkpoint is incomplete or damaged: resume from the newest complete older one, saying so. The
    damaged folder stays where Ray Train's snapshot lists it; the epochs trained again get new folder names."""
    for name, folder in _older_checkpoints(ctx, damaged):
        try:
            engine.restore(folder)
        except CheckpointError as e:
            if ctx.is_chief:
                ctx.run_dir.mark_damaged(name, str(e))
            continue
        engine.fallback_note = f"{error}; resumed from the older checkpoint {name}"
        if ctx.is_chief:
            say(f"[kcd_ray] {engine.fallback_note}")
        return
    raise error


def elastic_batch(cfg, world: int):
    """An elastic run (``scaling.min_workers``) below ``num_workers`` keeps the global batch ``optim.batch_size x
    num_workers``: each of the ``world`` workers takes that share (rounded), so the learning rate stays right."""
    sc = cfg.scaling
    if not sc.min_workers or world == sc.num_workers or world < 1:
        return cfg
    per = max(1, round(cfg.optim.batch_size * sc.num_workers / world))
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=per))


def _finisher(ctx: RunContext, device: torch.device) -> Optional[BatchFinisher]:
    """The last input stage on this worker's device when Ray Data serves uint8 rows (``data.augment_on``)."""
    augment_on = ctx.plan.inputs.augment_on
    if augment_on == "pipeline":
        return None
    return BatchFinisher(T.read_meta(ctx.data_dir), ctx.plan.data.augment, stage=augment_on,
                         channels_last=ctx.cfg.optim.channels_last and device.type == "cuda")


def _older_checkpoints(ctx: RunContext, name: Optional[str]):
    """(name, folder) of the complete checkpoints older than ``name`` (None: all), newest first; from an object
    store each is fetched when tried."""
    key = checkpoint_key(name) if name else None
    names = [n for n in ctx.run_dir.checkpoint_names() if key is None or checkpoint_key(n) < key]
    for older in reversed(names):
        if not ctx.run_dir.remote:
            yield older, ctx.run_dir.path / older
            continue
        uri, folder = storage.join(ctx.run_dir.remote, older), Path(tempfile.mkdtemp(prefix="kcd_ckpt_")) / older
        for rel in storage.list_files(uri):
            storage.download(storage.join(uri, rel), folder / rel)
        yield older, folder


def _open_storage(plan: RunPlan, filesystems: Optional[dict]) -> tuple[RunDir, str]:
    """The run folder (a working copy of the run's URI in an object store) and the data set folder (a local
    working copy of a data set in an object store, fetched once per node)."""
    storage.install(filesystems)
    run_dir = RunDir(plan.folder.path, remote=plan.folder.remote)
    data_dir = plan.data.dir
    if plan.data.uri:
        from kcd_ray.data.prepare import fetch_prepared

        data_dir = str(fetch_prepared(plan.data.uri, verbose=False))
    return run_dir, data_dir


def _context(plan: RunPlan, config: dict) -> RunContext:
    """This rank's context: rank, world size (elastic runs: the per-worker batch for it), folders, mask store."""
    tctx = ray.train.get_context() if plan.resources.num_workers else None  # it raises inside an in-process trial
    run_dir, data_dir = _open_storage(plan, config.get("storage"))
    world = tctx.get_world_size() if tctx else 1
    return RunContext.from_plan(plan, run_dir=run_dir, data_dir=data_dir, cfg=elastic_batch(plan.cfg, world),
                                mask_store=config["mask_store"], rank=tctx.get_world_rank() if tctx else 0,
                                world=world)


def _feeds(ctx: RunContext, device: torch.device):
    """(train batches of an epoch, test batches, validation batches or None): this worker's Ray Data shards, the
    training one finished on its device."""
    cfg, plan = ctx.cfg, ctx.plan
    train_shard = ray.train.get_dataset_shard("train")
    test_batches = TestBatches(ray.train.get_dataset_shard("test"), cfg.optim.eval_batch_size)
    val_batches = (TestBatches(ray.train.get_dataset_shard("val"), cfg.optim.eval_batch_size) if plan.data.num_val
                   else None)
    finish = _finisher(ctx, device)
    # A curriculum's sequential passes: batches cut at pass boundaries, with one worker only: a cut adds a step on
    # that rank alone, and DDP needs the same number of steps on every rank (with several, a batch at a boundary
    # holds the end of one pass and the start of the next; each sample still meets its own group's teacher).
    passes = np.asarray(plan.inputs.passes) if plan.inputs.passes is not None and ctx.world == 1 else None

    def train_batches(epoch: int):
        batches = iter_train_batches(train_shard, plan.selection.feed_batch_size, epoch=epoch, seed=cfg.optim.seed,
                                     shuffle_buffer=cfg.data.shuffle_buffer, finish=finish,
                                     pin_memory=device.type == "cuda")
        return batches if passes is None else split_passes(batches, passes)

    if cfg.curriculum.only_groups and cfg.curriculum.labels == "local":  # a group teacher: local labels
        return local_label_feeds(cfg.curriculum, ctx.data_dir, train_batches, test_batches, val_batches)
    return train_batches, test_batches, val_batches


def train_loop_per_worker(config: dict) -> Optional[dict]:
    """Ray Train's worker function: build the engine from the run plan, get the shards, run, report.
    ``config``: ``{"plan": RunPlan, "mask_store": name, "storage": the filesystems of the run's stores}``."""
    plan: RunPlan = config["plan"]
    quiet_ray_data_and_train()
    quiet_worker_error_echo()
    ctx = _context(plan, config)
    if ctx.is_chief:
        ctx.run_dir.sync_down()  # an object store: the files of the checkpoint this attempt resumes from
    share = plan.resources.cpus_per_worker if plan.resources.num_workers else (os.cpu_count() or 1)
    torch.set_num_threads(ctx.cfg.optim.threads or max(1, math.ceil(share)))
    device = worker_device(plan)
    engine = assemble_engine(plan, device, RayServices(ctx), ctx=ctx, hooks=[NodeInfo, RunSync],
                             distributed=D.active())
    _restore(engine, ctx)
    return engine.run(*_feeds(ctx, device))
