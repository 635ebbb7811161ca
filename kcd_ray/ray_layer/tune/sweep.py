"""Run a sweep on Ray Tune: one function trial per config, each fitting its own TorchTrainer (Train V2).

Layout of a sweep folder ``<storage_path>/<name>/``:

- ``sweep.yaml``  the resolved sweep (base config, space, search): re-running checks it is the same sweep
- ``tune/``       Ray Tune's experiment (trial state, searcher state): what restoring reads
- ``runs/<name>_<trial_id>/``  each trial's kcd_ray run folder (config.yaml, metrics.jsonl, summary.json, masks/)

A trial calls ``fit()`` as a run does. With Train workers (``scaling.num_workers >= 1``) rank 0's per-epoch
reports reach Tune through Train's ``TuneReportCallback``; an in-process trial (``num_workers=0``: the loop runs
inside the trial, the fastest way to sweep on a small machine) reports through an engine hook
(``kcd_ray.ray_layer.tune.hooks``). Either way Tune gets one result per epoch, then the run's summary.

Re-running the same command restores an interrupted sweep (``Tuner.restore``): finished trials are
kept, unfinished and errored ones resume from their own Train checkpoints, because a trial's run
name is derived from its trial id and Train V2 resumes a run of the same name.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from kcd_ray.config import Config, ConfigError, config_from_dict
from kcd_ray.ray_layer.tune.interrupt import SweepInterrupted, mark_interrupted
from kcd_ray.ray_layer.tune.resources import derive_concurrency, trial_resources, trial_scaling
from kcd_ray.sweeps.feasible import budget_problem, feasible_grid, has_budget, point_label
from kcd_ray.sweeps.space import Dim, apply_values, base_point, grid_size
from kcd_ray.sweeps.spec import SUMMARY_KEYS, Sweep, check_before_ray, load_sweep

GRID_POINT = "grid_point"  # the one grid key of a sweep whose infeasible budget points were left out


# --------------------------------------------------------------------------- trial side


def trial_label(trial) -> str:
    """Tune trial name and folder name; the baseline trial is marked so it is easy to spot."""
    return ("kd_" if trial.config.get("variant") == "kd" else "") + trial.trial_id


def run_name(sweep_name: str, trial_id: str, variant: str | None) -> str:
    return f"{sweep_name}_{'kd_' if variant == 'kd' else ''}{trial_id}"


class TrialFolder:
    """A trial's run folder (``<runs>/<sweep>_<trial id>``, ``kd_`` marking the baseline): a picklable callable."""

    def __init__(self, sweep_name: str, runs_location: str):
        self.sweep_name, self.runs_location = sweep_name, runs_location

    def __call__(self, trial) -> str:
        from kcd_ray import storage

        return storage.join(self.runs_location, run_name(self.sweep_name, trial.trial_id, trial.config.get("variant")))


def trial_config(config: dict, payload: dict, trial_id: str) -> Config:
    """The kcd_ray Config one trial runs: base + sampled values, its own run folder under the sweep."""
    values = {k: v for k, v in config.items() if k not in ("variant", GRID_POINT)}
    values.update(config.get(GRID_POINT) or {})  # a grid of feasible budget points: one value holds the point
    variant = config.get("variant")
    data = apply_values(payload["base"], values)
    if variant == "kd":  # plain KD, whichever selection strategy the base recipe runs
        data["kcd"]["enabled"] = False
        data.setdefault("selection", {})["strategy"] = "none"
    data["run"]["name"] = run_name(payload["name"], trial_id, variant)
    data["run"]["storage_path"] = payload["runs_dir"]
    data["run"]["sweep"] = payload["name"]  # run.trackers: trials tagged and grouped by sweep (engine/trackers.py)
    if payload.get("pbt"):  # an exploited trial continues another trial's checkpoint under a perturbed config
        data["run"]["resume"] = "force"
    data["scaling"].update(payload.get("scaling") or {})  # trials_at_once: each trial's share of the machine
    if data["scaling"]["num_workers"] == 0 and not data["optim"]["threads"]:
        # In-process trials share the machine: each gets the threads of its CPU reservation (as a Train worker
        # does), not one per core of the machine.
        data["optim"]["threads"] = max(1, math.ceil(data["scaling"]["cpus_per_worker"]))
    return config_from_dict(data)


def _trial(config: dict, payload: dict) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from kcd_ray.ray_layer.trainer import fit

    cfg = trial_config(config, payload, tune.get_context().get_trial_id())
    why = budget_problem(cfg, payload["kind"], payload["data"], payload["flops"]) if payload.get("data") else None
    if why is not None:  # a sampled point its strategy cannot run at: no run, and no figure for the searcher
        print(f"[kcd_ray] trial {tune.get_context().get_trial_id()}: not run: {why}", flush=True)
        tune.report({**{m: float("nan") for m in payload["metrics"]}, "epoch": 0, "infeasible": why})
        return
    # The same fit() as a run. Train workers' reports reach Tune through Train's callback; an in-process
    # run (num_workers=0) gets no Train callbacks, so an engine hook reports each epoch instead.
    if cfg.scaling.num_workers > 0:
        summary = fit(cfg, payload["kind"], callbacks=[TuneReportCallback()])
    else:
        from kcd_ray.ray_layer.tune.hooks import TUNE_REPORT  # registers the hook in this (the trial's) process

        pbt = bool(payload.get("pbt"))
        if pbt:
            _take_over_checkpoint(cfg)
        summary = fit(cfg, payload["kind"], hooks=[(TUNE_REPORT, {"checkpoint": pbt})])
        if pbt:  # no extra result: PBT would read it as another epoch at the barrier and restart the trial forever
            return
    final = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
    final.update(top1=summary["final_top1"], epoch=summary["epochs"] - 1, run_dir=str(summary.get("run_dir", "")))
    if "final_val_top1" in summary:  # the per-epoch names end the trial at their last epoch's values
        final.update(val_top1=summary["final_val_top1"], val_top5=summary["final_val_top5"],
                     val_loss=summary["final_val_loss"])
    tune.report(final)


def _take_over_checkpoint(cfg: Config) -> None:
    """PBT: when Tune restarts this trial from another trial's checkpoint, put it where an in-process run resumes
    from (``<run folder>/local_checkpoint``); the run then continues that trial's epochs under this config."""
    import shutil

    from ray import tune

    from kcd_ray.engine.rundir import RunDir, resolve_storage
    from kcd_ray.ray_layer.worker import local_checkpoint_dir

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return
    target = local_checkpoint_dir(RunDir(resolve_storage(cfg.run.storage_path) / cfg.run.name))
    with ckpt.as_directory() as src:
        if Path(src).resolve() == target.resolve():
            return
        tmp = target.with_name(target.name + ".incoming")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    shutil.rmtree(target.with_name(target.name + ".prev"), ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


# --------------------------------------------------------------------------- searchers


def to_tune(d: Dim):
    """A space dimension as Ray Tune's search-space object."""
    from ray import tune

    if d.kind == "grid":
        return tune.grid_search(list(d.values))
    if d.kind == "choice":
        return tune.choice(list(d.values))
    lo, hi = d.values
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[d.kind](lo, hi)


def _search_alg(sw: Sweep, baseline: dict | None, max_concurrent: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sw.search in ("grid", "random"):
        # The baseline is a preset point: it takes one of num_samples (run_sweep adds one for it).
        # Not a Searcher: TuneConfig.max_concurrent_trials would be ignored, so it gets the limit itself.
        return BasicVariantGenerator(points_to_evaluate=[baseline] if baseline else None,
                                     max_concurrent=max_concurrent, random_state=sw.seed)
    try:
        from ray.tune.search.optuna import OptunaSearch

        import optuna  # noqa: F401  (OptunaSearch imports it lazily; fail here, clearly)
    except ImportError:
        raise ConfigError(f"{sw.source}: search: optuna needs the optuna package (pip install 'kcd_ray[optuna]'); "
                          "or use search: grid or random") from None
    if sw.objectives:  # several objectives: Optuna's NSGA-II sampler searches the front
        searcher = OptunaSearch(metric=[m for m, _ in sw.objectives], mode=[d for _, d in sw.objectives],
                                sampler=optuna.samplers.NSGAIISampler(seed=sw.seed))
    else:
        searcher = OptunaSearch(metric=sw.metric, mode=sw.mode, seed=sw.seed)
    from kcd_ray.ray_layer.tune.searchers import BaselineFirst

    return BaselineFirst(searcher, baseline) if baseline else searcher


def _pbt(sw: Sweep):
    """Ray Tune's PBT over the sweep's ``pbt.mutate`` keys: lists are resampled/shifted among their values, ranges
    resampled from their distribution (Tune's explore: x0.8/x1.2 or a new sample)."""
    from ray.tune.schedulers import PopulationBasedTraining

    p = sw.pbt
    dims = {d.key: d for d in sw.dims}
    mutations = {k: (list(dims[k].values) if dims[k].kind in ("grid", "choice") else to_tune(dims[k]))
                 for k in p["mutate"]}
    return PopulationBasedTraining(time_attr="epoch", metric=p["metric"], mode=p["mode"],
                                   perturbation_interval=p["interval"], hyperparam_mutations=mutations,
                                   quantile_fraction=p["quantile"], resample_probability=p["resample_probability"],
                                   synch=True)


def _param_space(sw: Sweep, points: list | None) -> dict:
    """Tune's space: each dimension, or with ``points`` (the feasible grid points) one grid over them."""
    from ray import tune

    from kcd_ray.engine.selection import strategy_class

    cfg = config_from_dict(sw.base)
    variant = "teacher" if sw.kind == "teacher" else strategy_class(cfg).info(cfg)["tag"]
    if points is not None:
        return {GRID_POINT: tune.grid_search(points), "variant": variant}
    return {**{d.key: to_tune(d) for d in sw.dims}, "variant": variant}


def budget_points(sw: Sweep, base_plan) -> tuple[list | None, list]:
    """(the grid points that can meet their budget, [(point, why not)]) for a grid sweep over grid keys with a
    budget; (None, []) for any other sweep (its trials decide)."""
    if sw.search != "grid" or sw.kind != "distill" or not has_budget(sw.dims, sw.base) or \
            any(d.kind != "grid" for d in sw.dims):
        return None, []
    c = base_plan.compute
    kept, skipped = feasible_grid(sw.dims, sw.base, sw.kind, base_plan.data,
                                  (c.student_forward, c.student_backward, c.teacher_forward))
    if not kept:
        raise ConfigError(f"{sw.source}: no point of the grid can meet its selection.budget; the first: "
                          f"{point_label(skipped[0][0])}: {skipped[0][1]}")
    return kept, skipped


def sweep_metrics(sw: Sweep) -> list[str]:
    """Every metric Tune's searcher and scheduler read from a result."""
    names = [sw.metric, *(m for m, _ in sw.objectives or ()), (sw.asha or {}).get("metric"),
             (sw.pbt or {}).get("metric")]
    return list(dict.fromkeys(m for m in names if m))


def _trial_count(sw: Sweep, points: list | None) -> int:
    if points is not None:
        return len(points) * sw.num_samples
    return grid_size(sw.dims) * sw.num_samples if sw.search == "grid" else sw.num_samples


# --------------------------------------------------------------------------- driver


def plan_sweep(sw: Sweep):
    """The base recipe's run plan (its data set prepared, its teachers checked, its cache planned), without Ray:
    missing files fail here, in a second, not in every trial after Tune started."""
    from kcd_ray.engine.plan import plan_run

    check_before_ray(sw)
    return plan_run(config_from_dict(sw.base), sw.kind, open_folder=False)


def describe_sweep(sw: Sweep, base_plan) -> str:
    """``kcd-ray sweep --dry-run``: the sweep's trials, search and scheduler, then its base run's plan."""
    from kcd_ray.engine.plan import describe_plan

    points, skipped = budget_points(sw, base_plan)
    n = _trial_count(sw, points)
    scheduler = "ASHA on " + sw.asha["metric"] if sw.asha else ("PBT on " + sw.pbt["metric"] if sw.pbt else "none")
    lines = ["kcd-ray sweep plan (dry run: nothing trained, Ray not started)",
             f"sweep      {sw.name}: {n} trial(s){' + a plain-KD baseline' if sw.include_kd_baseline else ''}, "
             f"search {sw.search}, metric {sw.metric} ({sw.mode}), scheduler {scheduler}",
             f"folder     {sw.remote or sw.folder} (sweep.yaml, tune/, runs/<name>_<trial>/)",
             f"trials     at most {sw.max_concurrent_trials or 'as many as the cluster holds'} at once; "
             f"{sw.trial_cpus:g} CPU per trial driver"]
    lines += [f"space      {d.key}: {d.kind} {list(d.values)}" for d in sw.dims]
    lines += [f"skipped    {point_label(p)}: {why}" for p, why in skipped]
    lines += ["base run (each trial changes the space's keys):"]
    lines += ["  " + line for line in describe_plan(base_plan).splitlines()[1:] if not line.startswith("run ")]
    return "\n".join(lines)


def _same(old, new) -> bool:
    """Equal, except that config keys the stored sweep lacks (fields added to kcd_ray since) are ignored."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(_same(v, new.get(k)) for k, v in old.items()) and set(old) <= set(new)
    return old == new


def _write_spec(sw: Sweep) -> None:
    """Write ``sweep.yaml`` (a path, or one object in a store), or check that the folder holds this sweep."""
    import yaml

    from kcd_ray import storage

    where = storage.join(sw.remote, "sweep.yaml") if sw.remote else str(sw.folder / "sweep.yaml")
    if storage.exists(where):
        old = yaml.safe_load(storage.read_text(where)) or {}
        new = sw.identity()
        diff = [k for k in new if not _same(old.get(k), new[k])]
        if diff:
            raise ConfigError(f"{where}: this folder holds a different sweep (differs in: {', '.join(diff)}); "
                              "give the sweep another name= or storage_path=, or remove the folder")
        return
    if not sw.remote:
        sw.folder.mkdir(parents=True, exist_ok=True)
    storage.write_text(where, sw.to_yaml())


def _tune_storage(sw: Sweep) -> tuple[str, object]:
    """(storage_path, storage_filesystem) of the sweep's Tune experiment folder: Tune writes its trial and
    searcher state to the store itself, through the same pyarrow filesystem as kcd_ray's files."""
    if not sw.remote:
        return str(sw.folder), None
    from kcd_ray import storage

    fs, path = storage.filesystem(sw.remote)
    return path, fs


def _new_tuner(sw: Sweep, trainable, max_conc: int, verbose: int, points: list | None = None):
    """A fresh Tune experiment for the sweep: its search, scheduler (ASHA or PBT) and storage; ``points``: the
    feasible grid points, when infeasible budget points were left out."""
    from ray import tune

    tune_path, tune_fs = _tune_storage(sw)
    baseline = None
    if sw.include_kd_baseline:
        at = base_point(sw.dims, sw.base)
        baseline = {**({GRID_POINT: at} if points is not None else at), "variant": "kd"}
    num_samples = sw.num_samples + (1 if baseline else 0)
    scheduler = _pbt(sw) if sw.pbt else None
    if sw.asha:
        from kcd_ray.ray_layer.tune.early_stop import NotingASHA

        a = sw.asha
        scheduler = NotingASHA(run_folder=TrialFolder(sw.name, sw.runs_location), time_attr="epoch",
                               metric=a["metric"], mode=a["mode"], max_t=a["max_t"], grace_period=a["grace_period"],
                               reduction_factor=a["reduction_factor"])
    n = _trial_count(sw, points)
    print(f"[kcd_ray] sweep {sw.name}: {n + (1 if baseline else 0)} trials ({sw.search}"
          f"{', + plain-KD baseline' if baseline else ''}), up to {max_conc} at a time; folder "
          f"{sw.remote or sw.folder}", flush=True)
    # Preset baseline values outside a grid are intended: keep Tune's warning about them quiet.
    logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)
    return tune.Tuner(
        trainable,
        param_space=_param_space(sw, points),
        tune_config=tune.TuneConfig(search_alg=_search_alg(sw, baseline, max_conc), scheduler=scheduler,
                                    num_samples=num_samples,
                                    max_concurrent_trials=max_conc if sw.search == "optuna" else None,
                                    # In-process trials run in Tune's trial actor: a finished trial's process (torch,
                                    # kcd_ray and Ray Data imported) starts the next trial instead of a new one.
                                    reuse_actors=sw.reuse_trial_processes and sw.base["scaling"]["num_workers"] == 0
                                    and not sw.pbt,
                                    trial_name_creator=trial_label, trial_dirname_creator=trial_label),
        run_config=tune.RunConfig(name="tune", storage_path=tune_path, storage_filesystem=tune_fs, verbose=verbose),
    )


def run_sweep(sweep, overrides: list[str] | None = None, storage_path: str | None = None, resume: bool = True):
    """Run (or restore) a sweep; returns the sweep folder (a Path, or the URI of a sweep in an object store).
    ``sweep`` is a sweep file path or mapping."""
    import ray
    from ray import tune

    sw = load_sweep(sweep, overrides, storage_path)
    base_plan = plan_sweep(sw)  # data, teachers and the cache's plan, checked once here, before Ray and Tune start
    base_cfg = base_plan.cfg
    if sw.remote:
        from kcd_ray import storage

        storage.check(sw.remote, "storage_path")  # one line naming the URI: no bucket, no endpoint
    tune_path, tune_fs = _tune_storage(sw)
    tune_dir = f"{tune_path.rstrip('/')}/tune"
    if not resume and tune.Tuner.can_restore(tune_dir, storage_filesystem=tune_fs):
        raise ConfigError(f"{sw.remote or sw.folder}: a sweep of this name already exists; resume it, or pick another "
                          "name=")
    _write_spec(sw)
    if not ray.is_initialized():
        from kcd_ray.ray_layer.trainer import init_ray

        init_ray(base_cfg)
    if base_plan.cache is not None:  # the teacher-output cache, built once here: every trial then only reads it
        from kcd_ray.ray_layer.teacher_cache import ensure_teacher_cache

        ensure_teacher_cache(base_plan, verbose=base_cfg.run.verbose > 0)
    cluster = ray.cluster_resources()
    max_conc = sw.trials_at_once or sw.max_concurrent_trials or derive_concurrency(base_cfg, sw.trial_cpus, cluster)
    points, skipped = budget_points(sw, base_plan)
    for p, why in skipped:
        print(f"[kcd_ray] sweep {sw.name}: left out {point_label(p)}: {why}", flush=True)
    c = base_plan.compute
    payload = {"name": sw.name, "kind": sw.kind, "base": sw.base, "runs_dir": sw.runs_location, "pbt": sw.pbt,
               "scaling": trial_scaling(base_cfg, sw, cluster), "metrics": sweep_metrics(sw),
               "data": base_plan.data if has_budget(sw.dims, sw.base) else None,
               "flops": (c.student_forward, c.student_backward, c.teacher_forward)}
    trainable = tune.with_resources(tune.with_parameters(_trial, payload=payload),
                                    trial_resources(base_cfg, sw.trial_cpus, cluster, sw.trials_at_once))

    if resume and tune.Tuner.can_restore(tune_dir, storage_filesystem=tune_fs):
        print(f"[kcd_ray] restoring sweep {sw.name} from {sw.remote or sw.folder}", flush=True)
        tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=tune_fs)
    else:
        tuner = _new_tuner(sw, trainable, max_conc, base_cfg.run.verbose, points)
    try:
        results = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: Tune gave the signal back before it had stopped every trial
        raise SweepInterrupted(sw, mark_interrupted(sw)) from None
    # Tune's loop ends early only when it was stopped (Ctrl-C, SIGUSR1; tune/tune.py, run: `while not
    # runner.is_finished() and not experiment_interrupted_event.is_set()`), and it reports nothing else: trials it
    # had not started are left pending, and the ones it stopped are TERMINATED like finished ones, but their run
    # folders still say running (their processes were ended before their fit() could write anything).
    errors = [r for r in results if r.error is not None]
    pending = len(results) - results.num_terminated - len(errors)
    failed = {f"{sw.name}_{str(r.path).rstrip('/').rsplit('/', 1)[-1]}" for r in errors}  # run_name of trial_label
    stopped = mark_interrupted(sw, skip=failed)
    if pending > 0 or stopped > 0:
        raise SweepInterrupted(sw, stopped, pending + stopped, len(results))
    if sw.pbt:
        from kcd_ray.report.pbt import write_pbt_schedule

        write_pbt_schedule(sw.folder, results, sw.pbt["metric"])
    if errors and len(errors) == len(results):
        raise RuntimeError(f"sweep {sw.name}: every trial failed; first error ({errors[0].path}): {errors[0].error}")
    if errors:
        print(f"[kcd_ray] sweep {sw.name}: {len(errors)} of {len(results)} trials failed; re-run the same command "
              f"to retry them. First error: {errors[0].error}", flush=True)
    return sw.remote or sw.folder


# --------------------------------------------------------------------------- CLI wiring


def add_sweep_arguments(p) -> None:
    p.add_argument("--config", "-c", required=True, help="sweep file (experiments/sweeps/<name>.yaml)")
    p.add_argument("--storage-path", default=None,
                   help="folder holding sweep folders (default: the sweep's storage_path)")
    p.add_argument("--fresh", action="store_true", help="refuse to restore an existing sweep of the same name")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--dry-run", action="store_true", help="print the sweep's plan (trials, search, the base run's "
                                                           "plan) without starting Ray")
    p.add_argument("overrides", nargs="*",
                   help="sweep keys (num_samples=4, search=random) or config keys (optim.epochs=2)")


def main_sweep(args) -> int:
    if args.dry_run:
        sw = load_sweep(args.config, list(args.overrides or []), args.storage_path)
        print(describe_sweep(sw, plan_sweep(sw)), flush=True)
        return 0
    try:
        folder = run_sweep(args.config, overrides=list(args.overrides or []), storage_path=args.storage_path,
                           resume=not args.fresh)
    except SweepInterrupted as e:  # the CLI prints it and exits 130; name the very command that resumes it
        import shlex

        cmd = ["kcd-ray", "sweep", "--config", args.config, *(["--storage-path", args.storage_path]
                                                                if args.storage_path else []), *(args.overrides or [])]
        raise KeyboardInterrupt(str(e).replace("re-run the same command", "re-run `" + shlex.join(cmd) + "`")) from None
    if not args.no_report:
        from kcd_ray.report import report

        print(report(folder)["text"], flush=True)
    return 0
