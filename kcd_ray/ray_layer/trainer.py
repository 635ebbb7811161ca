"""Driver side of a run: execute a run plan with Ray: group teachers first, the run folder, Ray, the teacher
cache, and one TorchTrainer (Train V2) for the whole run.

``fit(cfg, kind)`` = ``execute(plan_run(cfg, kind))``: every decision is made by the plan
(:mod:`kcd_ray.engine.plan`); this module only carries it out and hands it to the workers
(:func:`kcd_ray.ray_layer.worker.train_loop_per_worker`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
import uuid

import numpy as np
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from kcd_ray import storage
from kcd_ray.config import Config, dump_yaml
from kcd_ray.data.device_augment import augment_stage
from kcd_ray.engine import resume
from kcd_ray.engine.assemble import hook_specs
from kcd_ray.engine.plan import ResourcePlan, RunPlan, epochs_done, last_checkpoint, plan_run
from kcd_ray.engine.rundir import RunDir
from kcd_ray.errors import as_run_error, one_line
from kcd_ray.ray_layer import compat
from kcd_ray.ray_layer.logs import quiet_ray_data_and_train, skip_known_ray_noise
from kcd_ray.ray_layer.mask_store import get_mask_store
from kcd_ray.ray_layer.pipeline import eval_dataset, train_dataset, train_ingest_options
from kcd_ray.ray_layer.resources import use_gpu
from kcd_ray.ray_layer.worker import train_loop_per_worker


def init_ray(cfg: Config) -> None:
    """Embedded local Ray by default; `run.ray_address` (or RAY_ADDRESS) attaches to a cluster."""
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ctx = ray.init(address=address, log_to_driver=True, runtime_env=compat.job_runtime_env())
    else:
        ctx = compat.start_local_ray(cfg.run.num_cpus or None, log_to_driver=True, configure_logging=True)
    # The State API is the cluster's dashboard (ray[default]): a cluster started without one (ray start
    # --include-dashboard=false) has none even where aiohttp is installed, and its warning is noise there too.
    has_state_api = bool(ctx.address_info.get("webui_url")) and importlib.util.find_spec("aiohttp") is not None
    skip_known_ray_noise(state_api_missing=not address or not has_state_api)


def teachers_at_once(cfg: Config, tcfg: Config) -> int:
    """How many group-teacher runs fit in the cluster's free resources together (at least 1); the config's
    ``curriculum.teacher_concurrency`` caps it."""
    if cfg.curriculum.teacher_concurrency:
        cap = cfg.curriculum.teacher_concurrency
    else:
        cap = cfg.curriculum.groups
    sc = tcfg.scaling
    free = ray.available_resources()
    cpus = max(1, sc.num_workers) * sc.cpus_per_worker + sc.data_cpus
    room = int(free.get("CPU", 0.0) // cpus)
    if use_gpu(sc):
        room = min(room, int(free.get("GPU", 0.0) // (max(1, sc.num_workers) * sc.gpus_per_worker)))
    return max(1, min(cap, room))


@ray.remote(num_cpus=0)
def _fit_teacher_task(tcfg: Config) -> str:
    return fit(tcfg, kind="teacher")["run_dir"]


def _fit_teachers(tcfgs: list) -> list[str]:
    """Run folders of teacher runs: in this process for one, as concurrent Ray tasks (each launching its own Ray
    Train run, which reserves its workers' resources; an in-process run reserves its CPUs on the task) for more."""
    if len(tcfgs) == 1:
        return [fit(tcfgs[0], kind="teacher")["run_dir"]]
    refs = []
    for t in tcfgs:
        own = t.scaling.cpus_per_worker + t.scaling.data_cpus if t.scaling.num_workers == 0 else 0
        refs.append(_fit_teacher_task.options(num_cpus=own).remote(t))
    return ray.get(refs)


def train_group_teachers(plan: RunPlan) -> RunPlan:
    """A curriculum's missing teachers (ED's per-group ones), trained first: one Ray Train run each, several at
    once when the cluster has room (``curriculum.teacher_concurrency``); then the run is planned again, with
    every teacher in place."""
    todo = list(plan.teacher.to_train)
    if not todo:
        return plan
    init_ray(plan.cfg)
    cfg = plan.cfg
    at_once = max(1, min(len(todo), teachers_at_once(cfg, todo[0][2])))
    for i in range(0, len(todo), at_once):
        wave = todo[i:i + at_once]
        if cfg.run.verbose:
            for g, path, tcfg in wave:
                print(f"[kcd_ray] ed: training the teacher of group {g}/{cfg.curriculum.groups} ({tcfg.model}, "
                      f"run {tcfg.run.name}) -> {path}" + (f" ({len(wave)} at once)" if len(wave) > 1 else ""),
                      flush=True)
        made = _fit_teachers([tcfg for _, _, tcfg in wave])
        for (_, path, _), run_dir in zip(wave, made):
            model = storage.join(run_dir, "final_model.pt")  # run_dir: a path, or the run's URI in a store
            if model != path:  # curriculum.teachers named where this group's teacher goes
                storage.write_bytes(path, storage.read_bytes(model))
    return plan_run(cfg, plan.kind, hooks=plan.hooks)


def open_run(plan: RunPlan) -> RunDir:
    """Create or re-open the run folder as the plan decided: move an old run aside (``run.resume=never``), record
    the start or resume in ``history.jsonl``, write ``config.yaml`` and ``status.json``."""
    f, cfg = plan.folder, plan.cfg
    run_dir = RunDir(f.path, remote=f.remote)
    if f.replace and run_dir.path.exists():
        aside = run_dir.path.with_name(f"{run_dir.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.path.rename(aside)
        print(f"[kcd_ray] run.resume=never: the previous run folder was moved to {aside}", flush=True)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if f.start == "resume":
        resume.record(run_dir, "resume", f.start_epoch, list(f.changes), epochs=cfg.optim.epochs)
        forced = [c for c in f.changes if not resume.resumable(c[0])]
        if forced:  # at every verbosity: the run's results will come from two configs
            print(f"[kcd_ray] run.resume=force: epochs {f.start_epoch + 1}-{cfg.optim.epochs} train under the changed "
                  + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in forced) + f"; epochs 1-{f.start_epoch} were "
                  "trained under the stored config (history.jsonl, summary.json's trained_under)", flush=True)
        elif f.changes and cfg.run.verbose:
            print("[kcd_ray] resuming with changed " + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in f.changes),
                  flush=True)
    else:
        resume.record(run_dir, "start", 0, epochs=cfg.optim.epochs)
    run_dir.write_text("config.yaml", dump_yaml(cfg))
    run_dir.write_json("status.json", {"state": "running", "kind": plan.kind})
    run_dir.sync_up()
    return run_dir


def on_cluster(plan: RunPlan) -> RunPlan:
    """The plan's ``scaling.use_gpu=auto`` and ``data.augment_on=auto`` decided against the running cluster."""
    gpu = use_gpu(plan.cfg.scaling)
    return plan.replace(resources=dataclasses.replace(plan.resources, use_gpu="true" if gpu else "false"),
                        inputs=dataclasses.replace(plan.inputs,
                                                   augment_on=augment_stage(plan.cfg.data.augment_on, gpu)))


def with_teacher_cache(plan: RunPlan) -> RunPlan:
    """The teacher-output cache the plan reads, built where units are missing (Ray Data batch inference)."""
    if plan.cache is None:
        return plan
    from kcd_ray.ray_layer.teacher_cache import ensure_teacher_cache

    return plan.replace(cache=ensure_teacher_cache(plan, verbose=plan.cfg.run.verbose > 0))


def fit(cfg: Config, kind: str = "distill", callbacks: list | None = None, *, hooks: list | None = None) -> dict:
    """Train a teacher (`kind="teacher"`) or distil a student (`kind="distill"`); returns the run summary.

    ``hooks``: extra engine hooks as ``[("name", {kwargs})]`` or Hook subclasses (test and drill hooks such as
    ``fail`` and ``record_ids``; never part of a config). Errors raised in a worker come back as their root
    exception, the full traceback in ``<run folder>/error.log`` (``kcd_ray.errors``); Ctrl-C raises
    :class:`Interrupted`, naming the last checkpoint.
    """
    return execute(plan_run(cfg, kind, hooks=hook_specs(hooks)), callbacks)


def execute(plan: RunPlan, callbacks: list | None = None) -> dict:
    """Carry out a run plan: teachers it needs first, the run folder, Ray, the cache, the TorchTrainer."""
    plan = train_group_teachers(plan)
    cfg = plan.cfg
    stored = os.path.join(plan.folder.path, "config.yaml")
    before = (open(stored).read() if os.path.exists(stored) else None, plan.folder.epochs_done)
    run_dir = open_run(plan)
    if cfg.run.verbose:
        print(f"[kcd_ray] {plan.kind} run {plan.folder.name}: {plan.data.num_train} train samples, "
              f"{plan.data.num_classes} classes, run folder {run_dir.where}", flush=True)
    if plan.teacher.note:  # a cache was asked for and is not used: said at every verbosity (summary.json records it)
        print(f"[kcd_ray] {plan.teacher.note}", flush=True)
    t0 = time.perf_counter()
    try:
        init_ray(cfg)
        plan = with_teacher_cache(on_cluster(plan))
        trainer = _trainer(plan, run_dir, callbacks)
        compat.keep_default_sigint(trainer)
        result = trainer.fit()
        run_dir.sync_down()  # an object store: what the workers uploaded (summary, metrics, masks)
    except KeyboardInterrupt:
        _sync_down_quietly(run_dir)
        _undo_if_nothing_trained(run_dir, *before)
        _finish(run_dir, "interrupted")
        raise Interrupted(run_dir, last_checkpoint(run_dir)) from None
    except Exception as e:  # noqa: BLE001 - every failure becomes its root cause + a traceback file
        _sync_down_quietly(run_dir)
        err = as_run_error(e, run_dir.path)
        _undo_if_nothing_trained(run_dir, *before)
        _finish(run_dir, "failed", error=one_line(err))
        raise err from None
    summary = result.return_value
    if summary is None:  # rank 0 returned nothing: read what it wrote
        summary = json.loads((run_dir.path / "summary.json").read_text())
    _finish(run_dir, "finished")
    if cfg.run.verbose:
        print(f"[kcd_ray] done in {time.perf_counter() - t0:.1f}s: final top1 {summary['final_top1']:.2f}, "
              f"best {summary['best_top1']:.2f}, compute ratio {summary['compute_ratio']:.3f}; "
              f"{storage.join(run_dir.where, 'summary.json')}", flush=True)
    return summary


def _undo_if_nothing_trained(run_dir: RunDir, old_config: str | None, epochs_before: int) -> None:
    """A start or resume that trained no epoch leaves config.yaml as it was: it tells what the run trained."""
    if old_config is not None and epochs_done(run_dir) == epochs_before:
        run_dir.write_text("config.yaml", old_config)


def _finish(run_dir: RunDir, state: str, **extra) -> None:
    try:
        run_dir.write_json("status.json", {"state": state, "epochs_done": epochs_done(run_dir), **extra})
        run_dir.sync_up()  # an object store: what the driver wrote (status, error.log, config.yaml undone)
    except OSError:
        pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: says where the last checkpoint is and that re-running the command resumes."""

    def __init__(self, run_dir: RunDir, checkpoint: str | None):
        where = f"last checkpoint {checkpoint}" if checkpoint else "no checkpoint yet (a re-run starts afresh)"
        super().__init__(f"interrupted: {where}; re-run the same command to resume (run folder {run_dir.where})")


def _sync_down_quietly(run_dir: RunDir) -> None:
    try:
        run_dir.sync_down()
    except OSError:  # the store went away too: the error being reported matters more
        pass


def scaling_config(r: ResourcePlan, resize_interval_s: float) -> ray.train.ScalingConfig:
    """Ray Train's ScalingConfig: ``num_workers`` fixed, or ``(min_workers, num_workers)`` (elastic)."""
    workers = (r.min_workers, r.num_workers) if r.elastic else r.num_workers
    gpu = r.use_gpu == "true"
    res = {"CPU": float(r.cpus_per_worker), **({"GPU": float(r.gpus_per_worker)} if gpu else {})}
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=res,
                                   placement_strategy=r.placement,
                                   elastic_resize_monitor_interval_s=float(resize_interval_s))


def _datasets(plan: RunPlan, mask_store: str) -> dict:
    cfg, r = plan.cfg, plan.resources
    passes = None if plan.inputs.passes is None else np.asarray(plan.inputs.passes, np.int64)
    return {
        "train": train_dataset(plan.data.dir, augment=cfg.data.augment, seed=cfg.optim.seed,
                               mask_store_name=mask_store, data_cpus=r.data_cpus, shuffle=plan.inputs.shuffle,
                               teacher_cache=plan.cache.to_dict() if plan.cache is not None else None,
                               augment_on=plan.inputs.augment_on, passes=passes, workers=r.num_workers),
        "test": eval_dataset(plan.data.dir, split="test", data_cpus=r.data_cpus),
        **({"val": eval_dataset(plan.data.dir, split="val", data_cpus=r.data_cpus)} if plan.data.num_val else {}),
    }


def _trainer(plan: RunPlan, run_dir: RunDir, callbacks) -> TorchTrainer:
    quiet_ray_data_and_train()
    cfg, name = plan.cfg, plan.folder.name
    # Every run has a store: it serves the data epoch (shuffle and augmentation seeds) and KCD's mask.
    mask_store = f"kcd_mask_{name}_{uuid.uuid4().hex[:8]}"
    get_mask_store(mask_store, create=True)
    teacher_files = [p for _, p in plan.teacher.files if p]
    loop_config = {"plan": plan, "mask_store": mask_store,
                   # an object store: the filesystems of the run's, the data set's and the teachers' URIs
                   "storage": storage.export(run_dir.remote, plan.data.uri, *teacher_files)}
    if run_dir.remote:  # Ray Train writes the checkpoints to the store through the same filesystem
        fs, parent = storage.filesystem(run_dir.remote.rsplit("/", 1)[0])
    else:
        fs, parent = None, str(run_dir.path.parent)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(plan.resources, plan.cfg.scaling.resize_interval_s),
        run_config=ray.train.RunConfig(
            name=name, storage_path=parent, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=callbacks or None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING" if cfg.run.verbose < 2 else "INFO"),
        ),
        datasets=_datasets(plan, mask_store),
        # One worker needs no split: iterating the dataset directly skips the SplitCoordinator hop
        # (bench/train_throughput.py). The evaluation splits are never split: each rank evaluates every world-th batch.
        # preserve_order: each worker sees the (seed, epoch) permutation exactly (Train would reset it otherwise).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if plan.resources.num_workers > 1 else [],
                                            execution_options=train_ingest_options()),
    )
