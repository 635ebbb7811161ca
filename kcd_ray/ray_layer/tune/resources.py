"""What each trial of a sweep reserves: the trial's driver, or its in-process loop's share of the machine
(``trials_at_once`` splits CPUs and GPUs between trials, fractional GPUs included), and how many trials fit."""

from __future__ import annotations

import math

from kcd_ray.config import Config
from kcd_ray.sweeps.spec import Sweep


def _wants_gpu(cfg: Config, cluster: dict) -> bool:
    from kcd_ray.ray_layer.resources import use_gpu

    return use_gpu(cfg.scaling, gpus=float(cluster.get("GPU", 0)))


DATA_TASKS_PER_TRIAL = 2  # a streaming read and a map task at once: with room for one, two trials' pipelines stall


def share_of(cluster: dict, trials_at_once: int, data_cpus: float) -> dict:
    """Each of ``trials_at_once`` trials' share of the machine: the CPUs left after two Ray Data tasks per trial
    (the read and the map of its pipeline run at once), and the GPUs, split evenly (fractional: several small
    students share a GPU)."""
    n = max(1, int(trials_at_once))
    cpus = max(0.1, (float(cluster.get("CPU", 1)) - n * DATA_TASKS_PER_TRIAL * data_cpus) / n)
    return {"cpu": round(cpus, 3), "gpu": round(float(cluster.get("GPU", 0)) / n, 3)}


def trial_resources(cfg: Config, trial_cpus: float, cluster: dict, trials_at_once: int = 0) -> dict:
    """What Tune reserves per trial: only its driver (Train V2 places the workers in their own group), or, for
    in-process trials, the loop's share: ``scaling.cpus_per_worker`` (and a GPU), or with ``trials_at_once`` the
    machine split between that many trials."""
    if cfg.scaling.num_workers == 0:  # the loop runs inside the trial itself
        if trials_at_once:
            share = share_of(cluster, trials_at_once, cfg.scaling.data_cpus)
            return share if _wants_gpu(cfg, cluster) else {"cpu": share["cpu"]}
        res = {"cpu": cfg.scaling.cpus_per_worker}
        if _wants_gpu(cfg, cluster):
            res["gpu"] = cfg.scaling.gpus_per_worker
        return res
    return {"cpu": trial_cpus}


def trial_scaling(cfg: Config, sw: Sweep, cluster: dict) -> dict:
    """``scaling`` keys each trial runs with when ``trials_at_once`` splits the machine: an in-process trial's loop
    gets its share's CPUs (and GPU fraction); a trial's Train workers split the share left after its driver."""
    if not sw.trials_at_once:
        return {}
    share = share_of(cluster, sw.trials_at_once, cfg.scaling.data_cpus)
    gpu = _wants_gpu(cfg, cluster) and share["gpu"] > 0
    n = max(1, cfg.scaling.num_workers)
    cpus = share["cpu"] if cfg.scaling.num_workers == 0 else max(0.1, share["cpu"] - sw.trial_cpus)
    return {"cpus_per_worker": round(cpus / n, 3), **({"gpus_per_worker": round(share["gpu"] / n, 3)} if gpu else {})}


def derive_concurrency(cfg: Config, trial_cpus: float, cluster: dict) -> int:
    """How many trials fit at once: driver + workers + two Ray Data tasks' CPUs (and the workers' GPUs).

    Leaving room for the data tasks matters: trials that take every CPU starve Ray Data and hang
    (docs/methods/ray.md); with room for one task per trial, two in-process trials on 2 CPUs stalled for good.
    """
    s = cfg.scaling
    own = s.cpus_per_worker if s.num_workers == 0 else trial_cpus + s.num_workers * s.cpus_per_worker
    per_cpu = own + DATA_TASKS_PER_TRIAL * s.data_cpus
    n = math.floor(cluster.get("CPU", 0) / per_cpu + 1e-9)
    if _wants_gpu(cfg, cluster):
        per_gpu = s.gpus_per_worker * max(s.num_workers, 1)
        n = min(n, math.floor(cluster.get("GPU", 0) / per_gpu + 1e-9))
    return max(1, n)


__all__ = ["derive_concurrency", "share_of", "trial_resources", "trial_scaling"]
