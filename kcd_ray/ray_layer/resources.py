"""The one resource rule: whether a run uses GPUs, and what a Train worker or a scoring actor asks Ray for.

``scaling.use_gpu``: "true" always, "false" never, "auto" when the cluster has a GPU. Train workers, the
in-process loop, the offline E-step's actors and Tune's trial packing all ask :func:`use_gpu`, so a run,
its E-step and a sweep never disagree.
"""

from __future__ import annotations

import ray


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def use_gpu(scaling, gpus: float | None = None) -> bool:
    if scaling.use_gpu == "auto":
        return (cluster_gpus() if gpus is None else gpus) > 0
    return scaling.use_gpu == "true"


def worker_resources(scaling, gpus: float | None = None) -> dict:
    """``resources_per_worker`` of one Train worker (or of an in-process trial's own reservation)."""
    res = {"CPU": float(scaling.cpus_per_worker)}
    if use_gpu(scaling, gpus):
        res["GPU"] = float(scaling.gpus_per_worker)
    return res


def scorer_resources(scaling) -> dict:
    """One offline E-step actor: a whole GPU when the run uses GPUs, else one Ray Data task's CPU share."""
    if use_gpu(scaling):
        return {"num_gpus": 1, "num_cpus": 0}
    return {"num_gpus": 0, "num_cpus": float(scaling.data_cpus)}
