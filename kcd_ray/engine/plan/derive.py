"""Deriving a run's decisions from its config and its data set's meta: pure functions, no I/O but reading meta.

Each ``plan_*`` function makes one part of the plan; :func:`derive_plan` puts them together. The parts that
know something about a method, strategy or curriculum ask that part's own declarations (the distiller class,
the ``SelectionStrategy`` subclass, the ``Curriculum`` subclass), never its name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from kcd_ray.cache.store import CacheSpec
from kcd_ray.config import Config, ConfigError, to_dict
from kcd_ray.data import transforms as T
from kcd_ray.data.device_augment import augment_stage
from kcd_ray.distill import DISTILLERS
from kcd_ray.engine.curriculum import check_curriculum, sequential_passes
from kcd_ray.engine.plan.types import (ComputePlan, DataPlan, FolderPlan, InputPlan, ResourcePlan, RunPlan,
                                       SelectionPlan, TeacherPlan)
from kcd_ray.engine.selection.base import strategy_class

KINDS = ("teacher", "distill")


def data_plan(data_dir, augment: str = "auto", uri: str = "") -> DataPlan:
    """The prepared data set at ``data_dir`` (``augment``: ``data.augment``, resolved against its image size)."""
    meta = T.read_meta(data_dir)
    return DataPlan(dir=str(data_dir), uri=uri, name=str(meta.get("name", "")),
                    num_train=int(meta["splits"]["train"]["num_rows"]),
                    num_test=int(meta["splits"].get("test", {}).get("num_rows", 0)),
                    num_val=int(meta["splits"].get("val", {}).get("num_rows", 0)),
                    num_classes=int(meta["num_classes"]), image_shape=tuple(T.image_shape(meta)),
                    augment=T.resolve_augment(augment, meta))


def method_class(cfg: Config, kind: str) -> type:
    return DISTILLERS.get("ce" if kind == "teacher" else cfg.distill.method)


def section_values(cfg: Config, sections) -> dict:
    """``{"selection.infobatch.ratio": 0.5, ...}``: the dotted values of the named config sections (or keys)."""
    out = {}
    root = to_dict(cfg)
    for section in sections:
        node = root
        for part in section.split("."):
            node = node[part]
        if isinstance(node, dict):
            out.update({f"{section}.{k}": v for k, v in _flat(node).items()})
        else:  # a single key (selection.seed)
            out[section] = node
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def plan_selection(cfg: Config, kind: str, num_train: int) -> SelectionPlan:
    cls = strategy_class(cfg, kind)
    if kind == "distill":
        cls.check(cfg)
        trained, fwd_only = cls.planned_fractions(cfg, num_train)
    else:
        trained, fwd_only = np.ones(cfg.optim.epochs), np.zeros(cfg.optim.epochs)
    return SelectionPlan(name=cls.name, cls=cls, info=cls.info(cfg),
                         params=section_values(cfg, cls.config_sections(cfg)),
                         images_made=cls.images_made(cfg) if kind == "distill" else "",
                         feed_batch_size=cls.feed_batch_size(cfg) if kind == "distill" else int(cfg.optim.batch_size),
                         trained=tuple(float(x) for x in trained), forward_only=tuple(float(x) for x in fwd_only),
                         forward_only_teacher=kind == "distill" and cls.scores_with_teacher_offline(cfg))


def cache_reason(cfg: Config, kind: str, selection: SelectionPlan) -> Optional[str]:
    """None when a teacher-output cache can stand in for the teacher in this run; else why not, in words."""
    if kind != "distill":
        return "a teacher run has no teacher"
    method = method_class(cfg, kind)
    if method.cache_outputs() is None:
        return (f"method {cfg.distill.method!r} needs the teacher's feature maps or several teachers (a cache holds "
                "one teacher's logits and feats[-1])")
    if selection.images_made == "batches":
        return f"selection.strategy {selection.name!r} remakes every training batch, views a cache has never seen"
    return None


def plan_cache(cfg: Config, kind: str, data: DataPlan, selection: SelectionPlan) -> tuple[Optional[CacheSpec], str]:
    """(the cache spec the run reads, or None; what the cache does for the run, in words)."""
    d = cfg.distill
    if d.cache == "off":
        return None, ""
    reason = cache_reason(cfg, kind, selection)
    if reason is not None:
        return None, f"distill.cache={d.cache} not used: {reason}; the teacher stays in the loop"
    feat = "feat" in method_class(cfg, kind).cache_outputs()
    plain = bool(selection.cls.scores_with_teacher_offline(cfg))
    spec = CacheSpec(dir=d.cache_dir, mode=d.cache, views=d.cache_views if d.cache == "views" else 0,
                     topk=d.cache_topk, feat=feat, seed=int(cfg.optim.seed), augment=data.augment,
                     epochs=int(cfg.optim.epochs), plain=plain)
    return spec, f"teacher outputs from the {d.cache} cache ({len(spec.units())} unit(s))"


def plan_teacher(cfg: Config, kind: str, selection: SelectionPlan, cache: Optional[CacheSpec],
                 to_train: tuple = ()) -> TeacherPlan:
    if kind != "distill":
        return TeacherPlan(method="ce", in_loop=False)
    method = method_class(cfg, kind)
    # With a cache, workers load the teacher only for rows it cannot serve (a strategy's new images).
    in_loop = cache is None or selection.images_made == "rows"
    return TeacherPlan(method=cfg.distill.method, files=tuple(method.teacher_files(cfg)), to_train=tuple(to_train),
                       in_loop=in_loop)


def plan_inputs(cfg: Config, kind: str, data: DataPlan, use_gpu: str) -> InputPlan:
    gpu = {"true": True, "false": False}.get(use_gpu)
    augment_on = ("auto" if gpu is None and cfg.data.augment_on == "auto"
                  else augment_stage(cfg.data.augment_on, bool(gpu)))
    passes = sequential_passes(cfg, data.num_classes) if kind == "distill" else None
    return InputPlan(augment_on=augment_on, shuffle=cfg.data.shuffle,
                     passes=None if passes is None else tuple(int(p) for p in passes), seed=int(cfg.optim.seed))


def plan_select(cfg: Config, data: DataPlan) -> str:
    """``run.select`` resolved: auto = val_top1 with a validation split, else top1 (test)."""
    choice = cfg.run.select
    if choice == "auto":
        return "val_top1" if data.num_val else "top1"
    if choice.startswith("val_") and not data.num_val:
        raise ConfigError(f"run.select: {choice} needs a validation split, and data set {data.name!r} has none: set "
                          "data.val_fraction (e.g. 0.1), or run.select=auto")
    return choice


def plan_resources(cfg: Config) -> ResourcePlan:
    sc = cfg.scaling
    if sc.min_workers and not 0 < sc.min_workers <= sc.num_workers:
        raise ConfigError(f"scaling.min_workers: expected 1..scaling.num_workers ({sc.num_workers}) for an elastic "
                          f"run, or 0; got {sc.min_workers}")
    return ResourcePlan(num_workers=sc.num_workers, min_workers=sc.min_workers, cpus_per_worker=sc.cpus_per_worker,
                        gpus_per_worker=sc.gpus_per_worker, use_gpu=sc.use_gpu, data_cpus=sc.data_cpus,
                        placement=sc.placement_strategy)


def plan_compute(selection: SelectionPlan, flops: tuple[float, float, float], teacher_paid: bool) -> ComputePlan:
    """Expected compute against plain KD over the same epochs, as the compute ledger counts it: per epoch, the
    trained share pays a student forward and backward and a teacher forward (cached or not; ``teacher_paid``: the
    teacher is left out of both), the forward-only share a student forward (and the teacher's, when those passes
    score with the teacher)."""
    sf, sb, tf = (float(x) for x in flops)
    trained, fwd = np.asarray(selection.trained), np.asarray(selection.forward_only)
    epochs = max(len(trained), 1)
    sample_ratio = float(trained.sum() / epochs)
    teacher = 0.0 if teacher_paid else tf
    per_kd = sf + sb + teacher
    per_fwd = sf + (teacher if selection.forward_only_teacher else 0.0)
    ratio = float((trained * per_kd + fwd * per_fwd).sum() / (epochs * per_kd)) if per_kd > 0 else sample_ratio
    return ComputePlan(student_forward=sf, student_backward=sb, teacher_forward=tf, planned_compute_ratio=ratio,
                       planned_sample_ratio=sample_ratio)


def teacher_paid(cfg: Config, cache) -> bool:
    """``selection.teacher_paid``: only with a teacher-output cache (without one, every run pays its teacher)."""
    if cfg.selection.teacher_paid and cache is None:
        raise ConfigError("selection.teacher_paid: counts a teacher-output cache's forwards as already paid; this run "
                          "has none (distill.cache=off, or one it cannot use): set distill.cache=exact or drop it")
    return bool(cfg.selection.teacher_paid)


def apply_budget(cfg: Config, kind: str, data: DataPlan, flops: tuple) -> tuple[Config, dict]:
    """``selection.budget`` turned into its strategy's parameter (``kcd_ray.engine.plan.budget``): the config to
    run and {key: value} it set; the config as it is without a budget."""
    if kind != "distill" or cfg.selection.budget is None:
        return cfg, {}
    from kcd_ray.engine.plan.budget import resolve_budget

    if cfg.curriculum.name != "none":
        raise ConfigError(f"selection.budget: with curriculum.name={cfg.curriculum.name} the student grows by grade "
                          "and its compute is not planned; set the strategy's own parameter (e.g. kcd.rho) instead")
    cls = strategy_class(cfg, kind)
    cached = plan_cache(cfg, kind, data, plan_selection(cfg, kind, data.num_train))[0]
    paid = teacher_paid(cfg, cached)

    def ratio_of(c: Config) -> float:
        return plan_compute(plan_selection(c, kind, data.num_train), flops, paid).planned_compute_ratio

    cfg, resolved, _ = resolve_budget(cfg, cls, cls.budget_knobs(cfg, data.num_train), ratio_of)
    return cfg, resolved


def derive_plan(cfg: Config, kind: str, *, data: DataPlan, folder: FolderPlan, hooks: tuple = (),
                to_train: tuple = (), flops: tuple = (0.0, 0.0, 0.0)) -> RunPlan:
    """Every decision of a run from its (path-resolved) config, its data set and its folder."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of: {', '.join(KINDS)}")
    check_curriculum(cfg, kind)
    resources = plan_resources(cfg)
    cfg, resolved = apply_budget(cfg, kind, data, flops)
    selection = plan_selection(cfg, kind, data.num_train)
    if cfg.selection.budget is not None and kind == "distill":
        selection = dataclasses.replace(selection, budget=cfg.selection.budget, resolved=resolved)
    cache, cache_note = plan_cache(cfg, kind, data, selection)
    teacher = plan_teacher(cfg, kind, selection, cache, to_train)
    if cache_note and cache is None:
        teacher = TeacherPlan(**{**teacher.__dict__, "note": cache_note})
    return RunPlan(cfg=cfg, kind=kind, data=data, folder=folder, teacher=teacher, selection=selection,
                   compute=plan_compute(selection, flops, teacher_paid(cfg, cache)),
                   inputs=plan_inputs(cfg, kind, data, resources.use_gpu), resources=resources,
                   select=plan_select(cfg, data), cache=cache,
                   cache_note=cache_note, hooks=tuple(hooks))


def local_plan(cfg: Config, kind: str, data_dir, run_dir=None, *, teacher_cache: Optional[CacheSpec] = None,
               hooks: tuple = ()) -> RunPlan:
    """A plan for a run driven in this process without a driver (tests, benchmarks): the data set at
    ``data_dir``, a new run in ``run_dir``; ``teacher_cache`` stands for a built cache."""
    from kcd_ray.engine.plan.prepare import measure_flops

    data = data_plan(data_dir, cfg.data.augment)
    path = str(Path(run_dir)) if run_dir is not None else ""
    teachers = None
    if kind == "distill" and cfg.curriculum.name == "none":  # FLOPs are an estimate: the engine names a bad file
        try:
            teachers = method_class(cfg, kind).load_teachers(cfg, data.num_classes)
        except (ConfigError, OSError):
            pass
    plan = derive_plan(cfg, kind, data=data, folder=FolderPlan(name=Path(path).name, path=path, remote="", start="new"),
                       hooks=hooks, flops=measure_flops(cfg, kind, data.num_classes, data.image_shape, teachers))
    if teacher_cache is not None:
        in_loop = plan.selection.images_made == "rows"
        plan = plan.replace(cache=teacher_cache, teacher=TeacherPlan(**{**plan.teacher.__dict__, "in_loop": in_loop}))
    return plan


__all__ = ["cache_reason", "data_plan", "derive_plan", "local_plan", "method_class", "plan_cache", "plan_compute",
           "plan_inputs", "plan_resources", "plan_selection", "plan_teacher", "section_values"]
