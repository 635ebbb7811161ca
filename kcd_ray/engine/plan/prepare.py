"""``plan_run``: what the driver decides and checks before a run trains, without Ray.

In order: resolve relative paths (workers run in the run folder), check the stores, prepare the data set (an
idempotent conversion, no Ray), check the curriculum against its classes, name the run and read its folder (a
resume, and which config changes it accepts), then load every teacher file that exists (so a wrong file fails in
a second, naming it) and measure FLOPs per sample on meta-device copies. Nothing here trains or starts Ray; the
Ray layer executes the plan (``kcd_ray.ray_layer.trainer.execute``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional


from kcd_ray import storage
from kcd_ray.config import Config, ConfigError, config_digest, load_config, to_dict
from kcd_ray.data import load_meta, prepare_dataset
from kcd_ray.engine.build import check_models
from kcd_ray.engine.curriculum import check_classes, check_curriculum, curriculum_class
from kcd_ray.engine.plan.derive import data_plan, derive_plan, method_class
from kcd_ray.engine.plan.types import FolderPlan, RunPlan
from kcd_ray.engine.resume import check_resume
from kcd_ray.engine.rundir import RunDir, run_folder, slug
from kcd_ray.engine.selection.base import strategy_class


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


_BAD_NAME = re.compile(r"[/\\]|^\.\.?$")


def check_run_name(name: str, key: str = "run.name") -> str:
    """A run (sweep, trial) name is one path component: it stays inside its storage folder."""
    if not name or not name.strip() or _BAD_NAME.search(name) or name.startswith("~") or Path(name).is_absolute():
        raise ConfigError(f"{key}: {name!r} is not a valid name; expected one folder name (no '/', '\\\\', '..' "
                          "or absolute path, not empty)")
    return name


def default_run_name(cfg: Config, kind: str) -> str:
    """Stable for a given config, so re-running the same command resumes the same run."""
    digest = config_digest(cfg)
    tag = strategy_class(cfg, kind).info(cfg)["tag"] if kind == "distill" else "teacher"
    return slug(f"{tag}-{cfg.distill.method if kind == 'distill' else 'ce'}-{cfg.model}-{cfg.data.name}-{digest}")


def last_checkpoint(run_dir: RunDir) -> Optional[str]:
    """The newest checkpoint folder (a URI for a run in an object store); None when the run has none."""
    p = run_dir.path
    found = [storage.join(run_dir.where, n) for n in run_dir.checkpoint_names()]
    for local in (p / "local_checkpoint", p / "local_checkpoint.prev"):  # in-process runs: in the working copy
        if (local / "state.pt").is_file():
            found.append(storage.join(run_dir.where, local.name))
    return found[-1] if found else None


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
    if checkpoint is None or not stored.exists():
        return FolderPlan(name=name, path=str(run_dir.path), remote=run_dir.remote, start="new",
                          epochs_done=epochs_done(run_dir))
    changes = check_resume(stored_config(stored), to_dict(cfg), cfg.run.resume, where=str(stored))
    return FolderPlan(name=name, path=str(run_dir.path), remote=run_dir.remote, start="resume",
                      epochs_done=epochs_done(run_dir), checkpoint=checkpoint, changes=tuple(changes))


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
        if nets and getattr(method_class(cfg, kind), "routes_rows", False):  # one teacher of several per row
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
    return derive_plan(cfg, kind, data=data, folder=folder, hooks=tuple(hooks), to_train=to_train, flops=flops)
