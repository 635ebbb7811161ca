"""``plan_run``: what the driver decides and checks before a run trains, without Ray.

In order: resolve relative paths (workers run in the run folder), check the stores, prepare the data set (an
idempotent conversion, no Ray), check the curriculum against its classes, name the run and read its folder (a
resume, and which config changes it accepts), then load every teacher file that exists (so a wrong file fails in
a second, naming it) and measure FLOPs per sample on meta-device copies. Nothing here trains or starts Ray; the
Ray layer executes the plan (``kcd_ray.ray_layer.trainer.execute``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional


from kcd_ray import storage
from kcd_ray.cache.store import check_manifest, read_manifest, resolve_cache, unit_problems
from kcd_ray.config import Config, ConfigError, config_digest, load_config, to_dict
from kcd_ray.data import load_meta, prepare_dataset
from kcd_ray.engine.build import check_models
from kcd_ray.engine.curriculum import check_classes, check_curriculum, curriculum_class
from kcd_ray.engine.plan.derive import data_plan, derive_plan, method_class
from kcd_ray.engine.plan.types import FolderPlan, RunPlan
from kcd_ray.engine.resume import check_resume, resumable
from kcd_ray.engine.rundir import CHECKPOINT_MANIFEST, RunDir, check_name, run_folder, slug
from kcd_ray.engine.selection.base import strategy_class
from kcd_ray.engine.trackers import check_tracking


def resolve_paths(cfg: Config) -> Config:
    """Relative teacher and cache paths made absolute here: workers run in the run folder (a URI stays)."""
    absolute = storage.absolute
    d, cur = cfg.distill, cfg.curriculum
    if not (d.teacher or d.teachers or cur.teachers or d.cache_dir):
        return cfg
    return dataclasses.replace(
        cfg, distill=dataclasses.replace(d, teacher=absolute(d.teacher), teachers=[absolute(p) for p in d.teachers],
                                         cache_dir=absolute(d.cache_dir)),
        curriculum=dataclasses.replace(cur, teachers=[absolute(p) for p in cur.teachers]))


def check_storage(cfg: Config) -> None:
    """An unreachable store or a missing bucket fails here, in one line naming the URI, before anything runs."""
    storage.check(cfg.run.storage_path, "run.storage_path")
    storage.check(cfg.data.root, "data.root")


check_run_name = check_name  # a run (sweep, trial) name is one folder name: kcd_ray.storage.check_name


def default_run_name(cfg: Config, kind: str) -> str:
    """Stable for a given config, so re-running the same command resumes the same run."""
    digest = config_digest(cfg)
    tag = strategy_class(cfg, kind).info(cfg)["tag"] if kind == "distill" else "teacher"
    return slug(f"{tag}-{cfg.distill.method if kind == 'distill' else 'ce'}-{cfg.model}-{cfg.data.name}-{digest}")


def last_checkpoint(run_dir: RunDir) -> Optional[str]:
    """The newest complete checkpoint folder (a URI for a run in an object store); None when the run has none."""
    p = run_dir.path
    found = [storage.join(run_dir.where, n) for n in run_dir.checkpoint_names()[-1:]]
    for local in (p / "local_checkpoint", p / "local_checkpoint.prev"):  # in-process runs: in the working copy
        if (local / "state.pt").is_file():
            found.append(storage.join(run_dir.where, local.name))
    return found[-1] if found else None


def checkpoint_start(run_dir: RunDir, checkpoint: str, fallback: int) -> int:
    """The epoch a resume from ``checkpoint`` starts at: its epoch + 1, from its manifest (``fallback``, the
    epochs in metrics.jsonl, for a checkpoint written before manifests existed)."""
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith("local_checkpoint"):
        try:
            epoch = json.loads((run_dir.path / name / CHECKPOINT_MANIFEST).read_text()).get("epoch")
        except (OSError, ValueError):
            epoch = None
    else:
        epoch = run_dir.checkpoint_epoch(name)
    return int(epoch) + 1 if isinstance(epoch, int) else fallback


def epochs_done(run_dir: RunDir) -> int:
    try:
        return len(run_dir.read_metrics())
    except ValueError:
        return 0


def stored_config(path: Path) -> dict:
    try:
        return to_dict(load_config(str(path)))
    except ValueError as e:  # an old or hand-edited config.yaml: say which file
        raise ValueError(f"{path}: the stored config of this run does not load ({e}); use a new run.name") from None


def check_forced(name: str, changes: list, start: int, epochs: int, sweep: str = "") -> None:
    """``run.resume=force`` on a run that has trained all its epochs: a changed training key would train nothing
    and only relabel the finished results (config.yaml and summary.json would name a config that never trained
    them). Refused; a forced change that trains (more epochs, or an unfinished run) trains the epochs from
    ``start`` under the new config, and history.jsonl and summary.json say which epochs trained under which.
    A sweep's PBT trial (``run.sweep`` set, forced by the sweep) continues another trial's checkpoint by design."""
    blocked = [c for c in changes if not resumable(c[0])]
    if blocked and start >= epochs and not sweep:
        text = ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in blocked)
        raise ConfigError(f"run.resume=force: run {name!r} has trained all {start} epochs (optim.epochs={epochs}) "
                          f"under its stored config, so the change ({text}) would train nothing; use "
                          "run.resume=never to retrain it afresh with the change, raise optim.epochs to train more "
                          "epochs under it, or pick a new run.name")


def plan_folder(cfg: Config, kind: str) -> FolderPlan:
    """The run folder and its resume decision (a config change the resume cannot take raises here)."""
    name = check_run_name(cfg.run.name or default_run_name(cfg, kind))
    run_dir = run_folder(cfg.run.storage_path, name)
    run_dir.sync_down(fresh=True)  # an object store: the run's files as the store holds them (no-op for a path)
    occupied = run_dir.path.exists() and any(run_dir.path.iterdir())
    if cfg.run.resume == "never" and occupied:
        if run_dir.remote:
            raise ConfigError(f"run.resume=never: {run_dir.remote} already holds a run and an object store cannot "
                              "move it aside; pick a new run.name or delete it")
        return FolderPlan(name=name, path=str(run_dir.path), remote=run_dir.remote, start="new", replace=True)
    checkpoint, stored = last_checkpoint(run_dir), run_dir.path / "config.yaml"
    done = epochs_done(run_dir)
    if checkpoint is None or not stored.exists():
        return FolderPlan(name=name, path=str(run_dir.path), remote=run_dir.remote, start="new", epochs_done=done)
    knobs = strategy_class(cfg, kind).budget_knobs(cfg, 1) if kind == "distill" else []
    changes = check_resume(stored_config(stored), to_dict(cfg), cfg.run.resume, where=str(stored),
                           budget_keys=tuple(k.key for k in knobs))
    start = checkpoint_start(run_dir, checkpoint, done)
    check_forced(name, changes, start, cfg.optim.epochs, cfg.run.sweep)
    return FolderPlan(name=name, path=str(run_dir.path), remote=run_dir.remote, start="resume", epochs_done=done,
                      start_epoch=start, checkpoint=checkpoint, changes=tuple(changes))


def check_teacher_files(cfg: Config, kind: str, skip: set) -> None:
    for key, path in method_class(cfg, kind).teacher_files(cfg) if kind == "distill" else []:
        if path in skip:
            continue
        if not path:
            raise ConfigError(f"{key}: a teacher checkpoint is required for distillation (train one with "
                              "`kcd-ray train-teacher`)")
        if not storage.exists(path):
            raise FileNotFoundError(f"{key}: {path} does not exist")


def measure_flops(cfg: Config, kind: str, num_classes: int, image_shape: tuple, teachers) -> tuple:
    """(student forward, student backward, teacher forward) FLOPs per sample, on meta-device copies."""
    from kcd_ray.engine.ledger import measure_flops as flops_of
    from kcd_ray.models import build_meta

    h, w, c = image_shape
    try:
        student = build_meta(cfg.model, num_classes, cfg.model_kwargs)
        sf, sb = flops_of(student, (c, h, w), backward=True, train=True)
        nets = teachers if isinstance(teachers, (list, tuple)) else [teachers] if teachers is not None else []
        tf = sum(flops_of(t, (c, h, w), backward=False, train=False)[0] for t in nets)
        if nets and method_class(cfg, kind).routes_rows:  # one teacher of several per row
            tf /= len(nets)
    except Exception:  # noqa: BLE001 - an estimate never fails a run: ratios then count sample-passes
        return 0.0, 0.0, 0.0
    return float(sf), float(sb), float(tf)


def plan_run(cfg: Config, kind: str = "distill", *, hooks: tuple = (), verbose: Optional[bool] = None,
             open_folder: bool = True) -> RunPlan:
    """The plan of ``kcd-ray distill`` / ``train-teacher`` for ``cfg``: checks, data, folder, teachers, FLOPs.
    ``open_folder=False`` (a sweep's base config: each trial has its own folder) leaves the run folder unread."""
    verbose = cfg.run.verbose > 0 if verbose is None else verbose
    cfg = resolve_paths(cfg)
    check_curriculum(cfg, kind)
    check_storage(cfg)
    check_tracking(cfg.run)  # a tracking server that does not answer: seconds here, not minutes of retries later
    data_dir = Path(prepare_dataset(cfg.data, verbose=verbose)).resolve()
    data = data_plan(data_dir, cfg.data.augment, uri=storage.staged_from(data_dir) or "")
    check_classes(cfg, data.num_classes)
    cur = curriculum_class(cfg) if kind == "distill" else None
    to_train: tuple = ()
    if cur is not None:
        todo = cur.teachers_to_train(cfg)
        cfg = cur.with_teachers(cfg, [path for _, path, _ in todo])
        to_train = tuple((g, path, tcfg) for g, path, tcfg in todo if not storage.exists(path))
    if open_folder:
        folder = plan_folder(cfg, kind)
    else:
        folder = FolderPlan(name="", path=str(storage.local_path(cfg.run.storage_path)) if not
                            storage.is_uri(cfg.run.storage_path) else "", remote="", start="new")
    check_teacher_files(cfg, kind, skip={path for _, path, _ in to_train})
    meta = load_meta(data_dir)
    check_models(cfg, kind, meta)  # a torchvision or factory student builds and runs on the data's images
    teachers = None
    if kind == "distill" and not to_train:  # loads and matches every teacher, or names the file
        teachers = method_class(cfg, kind).load_teachers(cfg, data.num_classes)
        if not isinstance(teachers, (list, tuple)):
            check_models(cfg, kind, meta, teachers, student=False)
    flops = measure_flops(cfg, kind, data.num_classes, data.image_shape, teachers)
    plan = derive_plan(cfg, kind, data=data, folder=folder, hooks=tuple(hooks), to_train=to_train, flops=flops)
    return check_cache(plan) if plan.cache is not None and not to_train else plan


def check_cache(plan: RunPlan) -> RunPlan:
    """The teacher-output cache's folder, key and units, checked before Ray starts (cheaply, as the prepared data
    set is: one listing, sizes; sha256 only of shards changed since the manifest): a cache made for another
    teacher, data set or seed is refused in one line; missing and damaged units are noted, and the build
    (``ensure_teacher_cache``, before training) makes them again."""
    cfg = plan.cfg
    spec, key, _ = resolve_cache(plan.cache, cfg, plan.data.dir)
    manifest, units = read_manifest(spec.dir), spec.units()
    damaged: dict = {}
    if manifest is not None:
        check_manifest(manifest, key, spec.dir)
        damaged = unit_problems(spec.dir, manifest, units)
    built = (manifest or {}).get("units", {})
    missing = [u for u in units if u not in built]
    note = plan.cache_note
    if damaged:
        note += "; damaged, rebuilt first: " + ", ".join(f"{u} ({why})" for u, why in damaged.items())
    if missing:
        note += f"; {len(missing)} unit(s) to build first"
    return plan.replace(cache=spec, cache_note=note)
