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
from kcd_ray.engine.rundir import RunDir
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
        name = f"checkpoint_epoch_{epoch:04d}"
        if self.ctx.is_chief:  # an object store: the epoch's masks, values and blends before its checkpoint
            self.ctx.run_dir.sync_up()
        if checkpoint is None or self.in_process:
            if checkpoint is not None:
                replace_checkpoint(local_checkpoint_dir(self.ctx.run_dir), checkpoint)
            if not self.in_process:  # in-process (maybe inside a Tune trial, where ray.train.report raises): nothing to send
                ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        folder = tempfile.mkdtemp(prefix="kcd_ckpt_")
        try:
            checkpoint(Path(folder))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # already persisted to storage by report()


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
    workers = ctx.plan.resources.num_workers
    ckpt = ray.train.get_checkpoint() if workers else None  # in-process: the local one below
    if ckpt is not None:
        with ckpt.as_directory() as folder:  # the folder in storage itself when it is local: no copy to clean
            try:
                engine.restore(folder)
            except CheckpointError as e:
                _fall_back(engine, ctx, Path(ckpt.path), e)  # ckpt.path: the folder's name in the store too
    elif workers and ctx.run_dir.checkpoint_names():
        _restore_unregistered(engine, ctx)
    elif ctx.world == 1 and (local := latest_local_checkpoint(local_checkpoint_dir(ctx.run_dir))) is not None:
        engine.restore(local)


def _restore_unregistered(engine: Engine, ctx: RunContext) -> None:
    """Ray Train restarted the worker group after a crash that came before its controller registered the newest
    checkpoint (``ray.train.report`` had written it to storage): resume from the newest intact one in the run
    folder instead of starting over, as a new ``fit`` on the same folder would."""
    for folder in _older_checkpoints(ctx, "checkpoint_epoch_~"):  # "~" sorts after every epoch number
        try:
            engine.restore(folder)
            return
        except CheckpointError:
            continue


def _fall_back(engine: Engine, ctx: RunContext, damaged: Path, error: CheckpointError) -> None:
    """The newest checkpoint is damaged: resume from the newest intact older one in the run folder, saying so."""
    for folder in _older_checkpoints(ctx, damaged.name):
        try:
            engine.restore(folder)
        except CheckpointError:
            continue
        if ctx.is_chief:
            say(f"[kcd_ray] {error}; resuming from the older checkpoint {folder} instead")
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


def _older_checkpoints(ctx: RunContext, name: str):
    """Checkpoint folders older than ``name``, newest first (from an object store: each fetched when tried)."""
    if not ctx.run_dir.remote:
        yield from sorted((d for d in ctx.run_dir.path.glob("checkpoint_epoch_*") if d.name < name), reverse=True)
        return
    for older in sorted((n for n in ctx.run_dir.checkpoint_names() if n < name), reverse=True):
        uri, folder = storage.join(ctx.run_dir.remote, older), Path(tempfile.mkdtemp(prefix="kcd_ckpt_")) / older
        for rel in storage.list_files(uri):
            storage.download(storage.join(uri, rel), folder / rel)
        yield folder


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
    val_batches = TestBatches(ray.train.get_dataset_shard("val"), cfg.optim.eval_batch_size) if plan.data.num_val else None
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
