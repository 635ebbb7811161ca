"""Driver side of a run: Ray, data, the run folder, and one TorchTrainer (Train V2) for the whole run."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from kcd_ray.config import Config, dump_yaml, to_dict
from kcd_ray.data import load_meta, prepare_dataset
from kcd_ray.data.mask import get_mask_store
from kcd_ray.data.pipeline import eval_dataset, train_dataset
from kcd_ray.train.loop import train_loop_per_worker
from kcd_ray.train.rundir import RunDir, resolve_storage, slug


def init_ray(cfg: Config) -> None:
    """Embedded local Ray by default; `run.ray_address` (or RAY_ADDRESS) attaches to a cluster."""
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" never attaches to a stray cluster someone else left running (RAY.md).
        ray.init(address="local", num_cpus=cfg.run.num_cpus or None, include_dashboard=False,
                 log_to_driver=True, configure_logging=True, logging_level="WARNING")
    _skip_known_ray_noise(state_api_missing=not address or importlib.util.find_spec("aiohttp") is None)


# Lines Ray's own actors print on every run that say nothing about this run; forwarded worker lines matching
# them are not echoed to the driver (they stay in the session's log files).
_RAY_NOISE = (
    # Ray Data's DatasetManager passes a deprecated option internally (Ray 2.60); nothing for a user to change.
    r"ExecutionOptions\.exclude_resources|self\.exclude_resources = exclude_resources",
    # Ray Train's own PreemptionWatcher / our Ray Data actors: a generic note about actor restarts (ray#53727).
    r"has constructor arguments in the object store and max_restarts > 0",
    # kcd_ray turns Ray Data's progress bars off on purpose (one epoch line instead).
    r"Progress bars disabled\. To enable",
    # streaming_split's coordinator actor announces every epoch's execution; the epoch line already has the time.
    r"Dataset \S+ execution finished in",
)
# Train V2's PlacementGroupCleaner polls the State API, which needs ray[default]'s dashboard. Without it the
# actor logs this every second or so for the whole run, and its check can never succeed anyway.
_STATE_API_NOISE = r"Failed to query Ray Train Controller actor state"


def _skip_known_ray_noise(state_api_missing: bool) -> None:
    from ray._private import ray_logging  # private, Ray 2.60 (pinned <2.61); a user's own skip regex wins

    pattern = re.compile("|".join(_RAY_NOISE + ((_STATE_API_NOISE,) if state_api_missing else ())))
    for d in (getattr(ray_logging, "stdout_deduplicator", None), getattr(ray_logging, "stderr_deduplicator", None)):
        if d is not None and getattr(d, "skip_re", "absent") is None:
            d.skip_re = pattern


def quiet_ray_data() -> None:
    """Ray Data's per-execution banners and progress lines drown the epoch lines: keep warnings only."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_run_name(cfg: Config, kind: str) -> str:
    """Stable for a given config, so re-running the same command resumes the same run."""
    d = to_dict(cfg)
    del d["run"]  # run.* (storage, verbosity, failures) never changes the experiment
    digest = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]
    tag = "kcd" if kind == "distill" and cfg.kcd.enabled else ("kd" if kind == "distill" else "teacher")
    return slug(f"{tag}-{cfg.distill.method if kind == 'distill' else 'ce'}-{cfg.model}-{cfg.data.name}-{digest}")


def _use_gpu(cfg: Config) -> bool:
    if cfg.scaling.use_gpu == "auto":
        return cfg.scaling.num_workers > 0 and bool(ray.cluster_resources().get("GPU", 0))
    return cfg.scaling.use_gpu == "true"


def fit(cfg: Config, kind: str = "distill", callbacks: list | None = None, *, extra_loop_config: dict | None = None) -> dict:
    """Train a teacher (`kind="teacher"`) or distil a student (`kind="distill"`); returns the run summary."""
    if kind not in ("teacher", "distill"):
        raise ValueError(f"kind: {kind!r} is not one of: teacher, distill")
    init_ray(cfg)
    if cfg.distill.teacher:  # workers run in the run folder: relative paths must be resolved here
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(
            cfg.distill, teacher=str(Path(os.path.expanduser(cfg.distill.teacher)).resolve())))
        if kind == "distill" and not Path(cfg.distill.teacher).exists():
            raise FileNotFoundError(f"distill.teacher: {cfg.distill.teacher} does not exist")
    data_dir = Path(prepare_dataset(cfg.data, verbose=cfg.run.verbose > 0)).resolve()
    meta = load_meta(data_dir)
    name = cfg.run.name or default_run_name(cfg, kind)
    storage = resolve_storage(cfg.run.storage_path)
    run_dir = RunDir(storage / name)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    run_dir.write_text("config.yaml", dump_yaml(cfg))
    if cfg.run.verbose:
        print(f"[kcd_ray] {kind} run {name}: {meta['splits']['train']['num_rows']} train samples, "
              f"{meta['num_classes']} classes, run folder {run_dir.path}", flush=True)

    quiet_ray_data()
    mask_store = None
    if kind == "distill" and cfg.kcd.enabled:
        mask_store = f"kcd_mask_{name}_{uuid.uuid4().hex[:8]}"
        get_mask_store(mask_store, create=True)
    datasets = {
        "train": train_dataset(str(data_dir), augment=cfg.data.augment, seed=cfg.optim.seed,
                               mask_store_name=mask_store, data_cpus=cfg.scaling.data_cpus, shuffle=cfg.data.shuffle),
        "test": eval_dataset(str(data_dir), split="test", data_cpus=cfg.scaling.data_cpus),
    }
    use_gpu = _use_gpu(cfg)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    loop_config = {"cfg": to_dict(cfg), "kind": kind, "run_dir": str(run_dir.path), "data_dir": str(data_dir),
                   "mask_store": mask_store, **(extra_loop_config or {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=callbacks or None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING" if cfg.run.verbose < 2 else "INFO"),
        ),
        datasets=datasets,
        # One worker needs no split: iterating the dataset directly skips the SplitCoordinator hop
        # (bench/train_throughput.py). The test split is never split: each rank evaluates every world-th batch.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if cfg.scaling.num_workers > 1 else []),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = result.return_value
    if summary is None:  # rank 0 returned nothing: read what it wrote
        summary = json.loads((run_dir.path / "summary.json").read_text())
    if cfg.run.verbose:
        print(f"[kcd_ray] done in {time.perf_counter() - t0:.1f}s: final top1 {summary['final_top1']:.2f}, "
              f"best {summary['best_top1']:.2f}, compute ratio {summary['compute_ratio']:.3f}; {run_dir.path}/summary.json",
              flush=True)
    return summary
