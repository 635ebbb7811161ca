"""Driver side of a run: Ray, data, the run folder, and one TorchTrainer (Train V2) for the whole run."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
import uuid
from pathlib import Path

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from kcd_ray import storage
from kcd_ray.config import Config, ConfigError, dump_yaml, load_config, to_dict
from kcd_ray.data import load_meta, prepare_dataset
from kcd_ray.engine import resume
from kcd_ray.engine.resume import check_resume
from kcd_ray.engine.curriculum import (MULTI_TEACHER, check_curriculum, check_pipeline, group_teacher_paths,
                                      load_teachers, sequential_passes, with_teachers)
from kcd_ray.engine.rundir import RunDir, run_folder, slug
from kcd_ray.engine.selection import resolve_strategy
from kcd_ray.errors import as_run_error, one_line
from kcd_ray.ray_layer import compat
from kcd_ray.ray_layer.logs import quiet_ray_data_and_train, skip_known_ray_noise
from kcd_ray.ray_layer.mask_store import get_mask_store
from kcd_ray.ray_layer.pipeline import augment_stage, eval_dataset, train_dataset, train_ingest_options
from kcd_ray.ray_layer.resources import use_gpu, worker_resources
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


def default_run_name(cfg: Config, kind: str) -> str:
    """Stable for a given config, so re-running the same command resumes the same run."""
    d = to_dict(cfg)
    del d["run"]  # run.* (storage, verbosity, failures) never changes the experiment
    digest = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]
    strategy = resolve_strategy(cfg, kind)  # kcd (kcd.enabled), kd (plain), infobatch, unixkd, random
    tag = ({"none": "kd"}.get(strategy, strategy)) if kind == "distill" else "teacher"
    return slug(f"{tag}-{cfg.distill.method if kind == 'distill' else 'ce'}-{cfg.model}-{cfg.data.name}-{digest}")


def _resolve_paths(cfg: Config) -> Config:
    # Workers run in the run folder: relative paths must be resolved here (a URI stays as it is).
    absolute = storage.absolute
    d, cur = cfg.distill, cfg.curriculum
    if not (d.teacher or d.teachers or cur.teachers or d.cache_dir):
        return cfg
    return dataclasses.replace(
        cfg, distill=dataclasses.replace(d, teacher=absolute(d.teacher), teachers=[absolute(p) for p in d.teachers],
                                         cache_dir=absolute(d.cache_dir)),
        curriculum=dataclasses.replace(cur, teachers=[absolute(p) for p in cur.teachers]))


def ensure_group_teachers(cfg: Config) -> Config:
    """ED's per-group teachers (ED.md 4): reuse the checkpoints that exist, train the missing ones first, one
    Ray Train run per group (local labels, n_g outputs), several at once when the cluster has room
    (``curriculum.teacher_concurrency``); the config then lists all G."""
    check_curriculum(cfg, "distill")  # one-line errors before any teacher trains
    check_pipeline(cfg)
    todo = [(g, path, tcfg) for g, path, tcfg in group_teacher_paths(cfg) if not storage.exists(path)]
    if todo:
        init_ray(cfg)
    at_once = max(1, min(len(todo), teachers_at_once(cfg, todo[0][2]) if todo else 1))
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
    return with_teachers(cfg, [path for _, path, _ in group_teacher_paths(cfg)])


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
def _fit_teacher_task(tcfg_dict: dict) -> str:
    from kcd_ray.config import config_from_dict

    return fit(config_from_dict(tcfg_dict), kind="teacher")["run_dir"]


def _fit_teachers(tcfgs: list) -> list[str]:
    """Run folders of teacher runs: in this process for one, as concurrent Ray tasks (each launching its own Ray
    Train run, which reserves its workers' resources; an in-process run reserves its CPUs on the task) for more."""
    if len(tcfgs) == 1:
        return [fit(tcfgs[0], kind="teacher")["run_dir"]]
    refs = []
    for t in tcfgs:
        own = t.scaling.cpus_per_worker + t.scaling.data_cpus if t.scaling.num_workers == 0 else 0
        refs.append(_fit_teacher_task.options(num_cpus=own).remote(to_dict(t)))
    return ray.get(refs)


def _teacher_files(cfg: Config) -> list[str]:
    return [p for p in (cfg.distill.teacher, *cfg.distill.teachers, *cfg.curriculum.teachers) if p]


def preflight(cfg: Config, kind: str, data_dir: Path) -> None:
    """What can fail before Ray starts fails here, in a second: the student's source (a factory that does not
    import, a model that does not take the data's images) and the teacher file (the prepared data set was
    verified by ``prepare_dataset``: footers and row counts, everything when its files changed)."""
    from kcd_ray.engine.build import check_models

    check_curriculum(cfg, kind)
    check_models(cfg, kind, load_meta(data_dir))
    if cfg.scaling.min_workers and not 0 < cfg.scaling.min_workers <= cfg.scaling.num_workers:
        _scaling_config(cfg.scaling)  # raises the one-line error
    if kind != "distill":
        return
    check_pipeline(cfg)
    if cfg.distill.method in MULTI_TEACHER:  # mtkd, ed: every listed teacher loads and fits its output width
        for key, paths in (("distill.teachers", cfg.distill.teachers), ("curriculum.teachers", cfg.curriculum.teachers),
                           ("distill.teacher", [cfg.distill.teacher] if cfg.distill.teacher else [])):
            for p in paths:
                if not storage.exists(p):
                    raise FileNotFoundError(f"{key}: {p} does not exist")
        load_teachers(cfg, int(load_meta(data_dir)["num_classes"]))
        return
    if not cfg.distill.teacher:
        raise ValueError("distill.teacher: a teacher checkpoint is required for distillation "
                         "(train one with `kcd-ray train-teacher`)")
    if not storage.exists(cfg.distill.teacher):
        raise FileNotFoundError(f"distill.teacher: {cfg.distill.teacher} does not exist")
    from kcd_ray.engine.build import load_teacher

    meta = load_meta(data_dir)
    teacher = load_teacher(cfg.distill, int(meta["num_classes"]))  # loads and matches, or names the file
    check_models(cfg, kind, meta, teacher, student=False)


def has_checkpoint(run_dir: RunDir) -> bool:
    return last_checkpoint(run_dir) is not None


def last_checkpoint(run_dir: RunDir) -> str | None:
    """The newest checkpoint folder (a URI for a run in an object store); None when the run has none."""
    p = run_dir.path
    found = [storage.join(run_dir.where, n) for n in run_dir.checkpoint_names()]
    for local in (p / "local_checkpoint", p / "local_checkpoint.prev"):  # in-process runs: in the working copy
        if (local / "state.pt").is_file():
            found.append(storage.join(run_dir.where, local.name))
    return found[-1] if found else None


def open_run(cfg: Config, kind: str, run_dir: RunDir) -> None:
    """Create or re-open the run folder: a re-run of a name with checkpoints must have a compatible config."""
    new = to_dict(cfg)
    stored = run_dir.path / "config.yaml"
    if run_dir.remote and cfg.run.resume == "never" and any(run_dir.path.iterdir()):
        raise ValueError(f"run.resume=never: {run_dir.remote} already holds a run and an object store cannot move "
                         "it aside; pick a new run.name or delete it")
    if run_dir.path.exists() and cfg.run.resume == "never" and any(run_dir.path.iterdir()):
        aside = run_dir.path.with_name(f"{run_dir.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.path.rename(aside)
        print(f"[kcd_ray] run.resume=never: the previous run folder was moved to {aside}", flush=True)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if has_checkpoint(run_dir) and stored.exists():
        changes = check_resume(_stored_config(stored), new, cfg.run.resume, where=str(stored))
        resume.record(run_dir, "resume", _epochs_done(run_dir), changes)
        if changes and cfg.run.verbose:
            print("[kcd_ray] resuming with changed " + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changes),
                  flush=True)
    else:
        resume.record(run_dir, "start", 0)
    run_dir.write_text("config.yaml", dump_yaml(cfg))
    run_dir.write_json("status.json", {"state": "running", "kind": kind})
    run_dir.sync_up()


def _stored_config(path: Path) -> dict:
    try:
        return to_dict(load_config(str(path)))
    except ValueError as e:  # an old or hand-edited config.yaml: say which file
        raise ValueError(f"{path}: the stored config of this run does not load ({e}); use a new run.name") from None


def _epochs_done(run_dir: RunDir) -> int:
    try:
        return len(run_dir.read_metrics())
    except ValueError:
        return 0


def _undo_if_nothing_trained(run_dir: RunDir, old_config: str | None, epochs_before: int) -> None:
    """A start or resume that trained no epoch leaves config.yaml as it was: it tells what the run trained."""
    if old_config is not None and _epochs_done(run_dir) == epochs_before:
        run_dir.write_text("config.yaml", old_config)


def _finish(run_dir: RunDir, state: str, **extra) -> None:
    try:
        run_dir.write_json("status.json", {"state": state, "epochs_done": _epochs_done(run_dir), **extra})
        run_dir.sync_up()  # an object store: what the driver wrote (status, error.log, config.yaml undone)
    except OSError:
        pass


def check_storage(cfg: Config) -> None:
    """An unreachable store or a missing bucket fails here, in one line naming the URI, before anything runs."""
    storage.check(cfg.run.storage_path, "run.storage_path")
    storage.check(cfg.data.root, "data.root")


def fit(cfg: Config, kind: str = "distill", callbacks: list | None = None, *, hooks: list | None = None) -> dict:
    """Train a teacher (`kind="teacher"`) or distil a student (`kind="distill"`); returns the run summary.

    ``hooks``: extra engine hooks as ``[("name", {kwargs})]`` (test and drill hooks such as ``fail`` and
    ``record_ids``; never part of a config). Errors raised in a worker come back as their root exception,
    the full traceback in ``<run folder>/error.log`` (``kcd_ray.ray_layer.errors``); Ctrl-C raises
    :class:`Interrupted`, naming the last checkpoint.
    """
    if kind not in ("teacher", "distill"):
        raise ValueError(f"kind: {kind!r} is not one of: teacher, distill")
    cfg = _resolve_paths(cfg)
    check_storage(cfg)
    data_dir = Path(prepare_dataset(cfg.data, verbose=cfg.run.verbose > 0)).resolve()
    if kind == "distill" and cfg.curriculum.name == "ed" and cfg.curriculum.teacher_source == "per_group":
        cfg = ensure_group_teachers(cfg)
    preflight(cfg, kind, data_dir)
    meta = load_meta(data_dir)
    name = cfg.run.name or default_run_name(cfg, kind)
    run_dir = run_folder(cfg.run.storage_path, name)
    run_dir.sync_down(fresh=True)  # an object store: the run's files as the store holds them (no-op for a path)
    stored = run_dir.path / "config.yaml"
    before = (stored.read_text() if stored.exists() else None, _epochs_done(run_dir))
    open_run(cfg, kind, run_dir)
    if cfg.run.verbose:
        print(f"[kcd_ray] {kind} run {name}: {meta['splits']['train']['num_rows']} train samples, "
              f"{meta['num_classes']} classes, run folder {run_dir.where}", flush=True)
    t0 = time.perf_counter()
    try:
        init_ray(cfg)
        from kcd_ray.ray_layer.teacher_cache import ensure_teacher_cache

        tcache = ensure_teacher_cache(cfg, data_dir, kind, verbose=cfg.run.verbose > 0) if kind == "distill" else None
        trainer = _trainer(cfg, kind, name, run_dir, data_dir, callbacks, hooks, tcache)
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
              f"{storage.join(run_dir.where, 'summary.json')}",
              flush=True)
    return summary


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


def _scaling_config(sc) -> ray.train.ScalingConfig:
    """Ray Train's ScalingConfig: ``num_workers`` fixed, or ``(min_workers, num_workers)`` (elastic)."""
    workers = sc.num_workers
    if sc.min_workers:
        if not 0 < sc.min_workers <= sc.num_workers:
            raise ConfigError(f"scaling.min_workers: expected 1..scaling.num_workers ({sc.num_workers}) for an "
                              f"elastic run, or 0; got {sc.min_workers}")
        workers = (sc.min_workers, sc.num_workers) if sc.min_workers < sc.num_workers else sc.num_workers
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu(sc), resources_per_worker=worker_resources(sc),
                                   placement_strategy=sc.placement_strategy,
                                   elastic_resize_monitor_interval_s=float(sc.resize_interval_s))


def _trainer(cfg: Config, kind: str, name: str, run_dir: RunDir, data_dir: Path, callbacks, hooks,
             tcache=None) -> TorchTrainer:
    quiet_ray_data_and_train()
    # Every run has a store: it serves the data epoch (shuffle and augmentation seeds) and KCD's mask.
    mask_store = f"kcd_mask_{name}_{uuid.uuid4().hex[:8]}"
    get_mask_store(mask_store, create=True)
    augment_on = augment_stage(cfg, use_gpu(cfg.scaling))  # the dataset and the workers' finishing stage agree
    datasets = {
        "train": train_dataset(str(data_dir), augment=cfg.data.augment, seed=cfg.optim.seed,
                               mask_store_name=mask_store, data_cpus=cfg.scaling.data_cpus, shuffle=cfg.data.shuffle,
                               teacher_cache=tcache.to_dict() if tcache is not None else None,
                               augment_on=augment_on,
                               passes=sequential_passes(cfg, int(load_meta(data_dir)["num_classes"])),
                               workers=cfg.scaling.num_workers),
        "test": eval_dataset(str(data_dir), split="test", data_cpus=cfg.scaling.data_cpus),
    }
    data_uri = storage.staged_from(data_dir)
    loop_config = {"cfg": to_dict(cfg), "kind": kind, "run_dir": str(run_dir.path), "data_dir": str(data_dir),
                   "mask_store": mask_store, "hooks": list(hooks or []), "augment_on": augment_on,
                   "teacher_cache": tcache.to_dict() if tcache is not None else None,
                   # an object store: the run's and the data set's URIs, and their filesystems for the workers
                   "run_uri": run_dir.remote, "data_uri": data_uri, "storage": storage.export(run_dir.remote, data_uri, *_teacher_files(cfg))}
    if run_dir.remote:  # Ray Train writes the checkpoints to the store through the same filesystem
        fs, parent = storage.filesystem(run_dir.remote.rsplit("/", 1)[0])
    else:
        fs, parent = None, str(run_dir.path.parent)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=_scaling_config(cfg.scaling),
        run_config=ray.train.RunConfig(
            name=name, storage_path=parent, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=callbacks or None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING" if cfg.run.verbose < 2 else "INFO"),
        ),
        datasets=datasets,
        # One worker needs no split: iterating the dataset directly skips the SplitCoordinator hop
        # (bench/train_throughput.py). The test split is never split: each rank evaluates every world-th batch.
        # preserve_order: each worker sees the (seed, epoch) permutation exactly (Train would reset it otherwise).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if cfg.scaling.num_workers > 1 else [],
                                            execution_options=train_ingest_options()),
    )
