"""Building the teacher-output cache: one Ray Data batch-inference pass on an actor pool (a GPU per actor when
the run uses GPUs, a fractional CPU here), writing one Parquet shard per unit (``kcd_ray.cache.store``).

Work items are (unit, row range) pairs; the driver streams the results, and as soon as a unit has every training
row it writes that unit's shard and records it in the manifest. An interrupted build therefore restarts at the
first unfinished unit; a finished one is never recomputed. A file lock on the cache folder makes concurrent
callers (the trials of a sweep started without the driver-side build) wait for one builder.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import ray.data
import torch

from kcd_ray import storage
from kcd_ray.cache.store import (CacheSpec, check_manifest, read_manifest, resolve_cache, shard_table,
                                 unit_problems, unit_uniform_key, write_manifest, write_shard)
from kcd_ray.data import transforms as T
from kcd_ray.ray_layer.resources import scorer_resources

ITEM_ROWS = 512  # rows per work item: small enough for steady progress, large enough for a full teacher batch


def say(msg: str) -> None:
    print(f"[kcd_ray] teacher cache: {msg}", flush=True)


@contextmanager
def _locked(folder: str):
    """Builders of one cache wait for each other (on one machine; for a cache in an object store, through its
    local working folder)."""
    local = storage.stage_dir(folder) if storage.is_uri(folder) else Path(folder)
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process builds this cache
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class TeacherForward:
    """Ray Data actor: the teacher loaded once; each work item is a row range of one unit, read from the split's
    Parquet files (only those rows: memory stays one item's images whatever the split's size), augmented exactly
    as the training pipeline augments it for that unit, then the teacher's forward."""

    def __init__(self, teacher_path: str, teacher_model: str, num_classes: int, data_dir: str, augment: str,
                 seed: int, feat: bool, use_gpu: bool, threads: int, teacher_kwargs: dict | None = None,
                 teacher_taps: tuple = ()):
        import pyarrow.dataset as pads

        from kcd_ray.models import load_model
        from kcd_ray.data.row_maps import uint8_images

        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.teacher = load_model(teacher_path, name=teacher_model or None, num_classes=num_classes,
                                  kwargs=teacher_kwargs, taps=teacher_taps)
        self.teacher.to(self.device).eval()
        self.meta, self.kind, self.seed, self.feat = T.read_meta(data_dir), augment, int(seed), feat
        # Row r of the build's items is row r of the split in file order (files sorted, rows sorted by sample_id).
        files = sorted(str(f) for f in (Path(data_dir) / "train").glob("part-*.parquet"))
        self.split = pads.dataset(files, format="parquet")
        self.uint8_images = uint8_images

    def __call__(self, batch: dict) -> dict:
        unit, start, stop = str(batch["unit"][0]), int(batch["start"][0]), int(batch["stop"][0])
        rows = self.split.take(np.arange(start, stop), columns=["sample_id", "image"])
        ids = rows.column("sample_id").to_numpy().astype(np.int64)
        x = self.uint8_images(rows.column("image"), self.meta, ids)
        key = unit_uniform_key(unit, self.seed)
        if key is None:
            img = T.eval_transform(x, self.meta)
        else:
            img = T.train_transform(x, self.meta, self.kind,
                                    uniforms=T.sample_uniforms(ids, T.n_uniforms(self.kind), key))
        # Forward in sub-batches: on 2 CPU cores resnet32x4 ran 156 img/s at 64 rows against 90 at 512 (the
        # activations of 512 rows overflow the caches); a GPU takes larger ones.
        step = 256 if self.device.type == "cuda" else 64
        zs, fs = [], []
        with torch.no_grad():
            for i in range(0, len(ids), step):
                z, f = self._forward(img[i:i + step].to(self.device))
                zs.append(z)
                fs.append(f)
        return {"unit": np.array([unit] * len(ids)), "sample_id": ids, "logits": np.concatenate(zs),
                "feat": np.concatenate(fs)}

    def _forward(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.feat:
            feats, z = self.teacher(img, is_feat=True)
            return z.float().cpu().numpy(), feats[-1].flatten(1).float().cpu().numpy()
        return self.teacher(img).float().cpu().numpy(), np.zeros((len(img), 0), np.float32)


def _probe(cfg, num_classes: int, meta: dict) -> dict:
    """What a worker that never loads the teacher needs from it: feature shapes and forward FLOPs per sample."""
    from kcd_ray.distill import DISTILLERS
    from kcd_ray.engine.ledger import measure_flops

    teacher = DISTILLERS.get(cfg.distill.method).load_teachers(cfg, num_classes).eval()  # the cache's one teacher
    h, w, c = T.image_shape(meta)
    with torch.no_grad():
        feats, _ = teacher(torch.zeros(2, c, h, w), is_feat=True)
    try:
        flops = measure_flops(teacher, (c, h, w), backward=False, train=False)[0]
    except Exception:  # noqa: BLE001 - an estimate never fails a build
        flops = 0.0
    return {"teacher_shapes": [list(f.shape[1:]) for f in feats], "teacher_flops": float(flops)}


def _build(cfg, spec: CacheSpec, data_dir: Path, meta: dict, manifest: dict, todo: list[str], verbose: bool) -> None:
    from kcd_ray.ray_layer.logs import quiet_ray_data_and_train

    quiet_ray_data_and_train()
    n = int(meta["splits"]["train"]["num_rows"])
    items = [{"unit": u, "start": s, "stop": min(s + ITEM_ROWS, n)} for u in todo for s in range(0, n, ITEM_ROWS)]
    res = scorer_resources(cfg.scaling)
    actors = max(1, int(cfg.kcd.offline_actors))
    # The build runs before any trainer (or waits for it under the lock): its CPU actors may use the free cores.
    free = float(ray.available_resources().get("CPU", 1.0))
    threads = max(1, math.ceil(cfg.scaling.cpus_per_worker), int(free // actors))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        TeacherForward, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(teacher_path=cfg.distill.teacher, teacher_model=cfg.distill.teacher_model,
                                   teacher_kwargs=cfg.distill.teacher_kwargs,
                                   teacher_taps=tuple(cfg.distill.teacher_taps),
                                   num_classes=int(meta["num_classes"]), data_dir=str(data_dir), augment=spec.augment,
                                   seed=spec.seed, feat=spec.feat, use_gpu=res["num_gpus"] > 0, threads=threads),
        **res)
    parts: dict[str, list] = {u: [] for u in todo}
    rows = dict.fromkeys(todo, 0)
    t0, done = time.perf_counter(), 0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        u = str(b["unit"][0])
        parts[u].append((b["sample_id"], b["logits"], b["feat"]))
        rows[u] += len(b["sample_id"])
        if rows[u] < n:
            continue
        ids, logits, feat = (np.concatenate(x) for x in zip(*parts.pop(u)))
        entry = write_shard(spec.dir, u, shard_table(ids, logits, feat if spec.feat else None, spec.topk))
        manifest["units"][u] = entry
        write_manifest(spec.dir, manifest)
        done += 1
        if verbose:
            el = time.perf_counter() - t0
            say(f"unit {u} done ({done}/{len(todo)}, {n} rows, {done * n / el:.0f} samples/s, "
                f"~{el / done * (len(todo) - done):.0f}s left)")


def ensure_teacher_cache(plan, *, verbose: bool = True, deep: bool = False) -> Optional[CacheSpec]:
    """The plan's CacheSpec completed (folder, teacher shapes and FLOPs), building whatever units are missing or
    damaged first (``unit_problems``: sizes always, sha256 of changed shards, of every shard when ``deep``);
    None when the plan keeps the teacher in the loop (``plan.cache`` is None)."""
    if plan.cache is None:
        return None
    cfg, data_dir = plan.cfg, Path(plan.data.dir)
    spec, key, meta = resolve_cache(plan.cache, cfg, data_dir)
    folder, num_classes = spec.dir, int(meta["num_classes"])
    with _locked(folder):
        manifest = read_manifest(folder) or {"key": key, "units": {}, "builds": []}
        check_manifest(manifest, key, folder)
        if "teacher_shapes" not in manifest:
            manifest.update(_probe(cfg, num_classes, meta))
        for unit, why in unit_problems(folder, manifest, spec.units(), deep=deep).items():
            say(f"unit {unit} ({storage.join(folder, unit + '.parquet')}): {why}; rebuilding it")  # any verbosity
            del manifest["units"][unit]
        todo = [u for u in spec.units() if u not in manifest["units"]]
        if todo:
            _build_units(cfg, spec, data_dir, meta, manifest, todo, verbose)
        elif verbose:
            say(f"reusing {folder} ({len(spec.units())} unit(s){', every shard checked' if deep else ''})")
    shapes = manifest["teacher_shapes"]
    return dataclasses.replace(spec, teacher_shapes=tuple(tuple(s) for s in shapes),
                               feat_shape=tuple(shapes[-1]), teacher_flops=float(manifest["teacher_flops"]))


def _build_units(cfg, spec: CacheSpec, data_dir: Path, meta: dict, manifest: dict, todo: list[str],
                 verbose: bool) -> None:
    n = int(meta["splits"]["train"]["num_rows"])
    if verbose:
        say(f"building {len(todo)} unit(s) x {n} rows in {spec.dir}")
    t0 = time.perf_counter()
    _build(cfg, spec, data_dir, meta, manifest, todo, verbose)
    manifest.setdefault("builds", []).append(
        {"units": todo, "teacher_forwards": len(todo) * n, "seconds": round(time.perf_counter() - t0, 3),
         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_manifest(spec.dir, manifest)


def build_for_config(cfg) -> CacheSpec:
    """``kcd-ray cache-teacher``: plan the distillation (``distill.cache=off`` -> exact), start Ray, build the
    cache it reads: its missing units and any unit whose shard is missing or differs from the manifest."""
    from kcd_ray.config import ConfigError
    from kcd_ray.engine.plan import plan_run
    from kcd_ray.ray_layer.trainer import init_ray

    if cfg.distill.cache == "off":
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, cache="exact"))
    plan = plan_run(cfg, "distill")
    if plan.cache is None:
        from kcd_ray.engine.plan.derive import cache_reason

        raise ConfigError(f"distill.cache: nothing to build: {cache_reason(plan.cfg, 'distill', plan.selection)}")
    init_ray(plan.cfg)
    spec = ensure_teacher_cache(plan, verbose=True, deep=True)  # the repair command: every shard's sha256
    say(f"ready: {spec.dir}")
    return spec
