"""The E-step on Ray: where per-sample knowledge values come from.

- Online (default): every training worker scores the samples it just trained on from the forward pass it
  already did (`loop.py` calls the value function); `gather_online_values` joins them by sample id across
  workers once per epoch, so the accumulator sees every kept sample exactly once per epoch.
- Offline: `offline_estep` runs a Ray Data batch-inference pass on an actor pool over ALL N training
  samples (condensed-away ones included, no augmentation) with the current student (and teacher when the
  value function needs it), writes the value table to Parquet and feeds it to the accumulator.

Both write the same value table: Parquet with ``sample_id`` int64, ``value`` float32, ``epoch`` int32, ``source``.
The pure accumulation (OGVE) lives in `kcd_ray.condense.ogve`.
"""

from __future__ import annotations

import math
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from kcd_ray.train.rundir import RunDir

VALUE_SCHEMA = pa.schema([("sample_id", pa.int64()), ("value", pa.float32()), ("epoch", pa.int32()), ("source", pa.string())])


def gather_online_values(kcd, ids_seen: list, values_seen: list, world: int) -> tuple[np.ndarray, np.ndarray]:
    """All-gather (ids, values) of this epoch from every worker and fold them into the accumulator (every rank)."""
    ids = torch.cat(ids_seen).numpy().astype(np.int64) if ids_seen else np.zeros(0, np.int64)
    vals = torch.cat(values_seen).numpy().astype(np.float32) if values_seen else np.zeros(0, np.float32)
    if world > 1 and dist.is_initialized():
        parts: list = [None] * world
        dist.all_gather_object(parts, (ids, vals))
        ids = np.concatenate([p[0] for p in parts])
        vals = np.concatenate([p[1] for p in parts])
    if len(ids):
        kcd.observe(ids, vals)
        kcd.end_epoch()
    return ids, vals


def value_table_path(run_dir: RunDir, epoch: int, source: str):
    return run_dir.sub("values", f"values_e{epoch:04d}_{source}.parquet")


def write_value_table(run_dir: RunDir, epoch: int, ids: np.ndarray, vals: np.ndarray, source: str) -> str:
    order = np.argsort(ids, kind="stable")
    table = pa.table({
        "sample_id": pa.array(ids[order], pa.int64()), "value": pa.array(vals[order], pa.float32()),
        "epoch": pa.array(np.full(len(ids), epoch, np.int32)), "source": pa.array([source] * len(ids), pa.string()),
    }, schema=VALUE_SCHEMA)
    path = value_table_path(run_dir, epoch, source)
    pq.write_table(table, path)
    return str(path)


def read_value_table(path) -> tuple[np.ndarray, np.ndarray]:
    try:
        t = pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable value table ({e})") from None
    missing = {"sample_id", "value"} - set(t.column_names)
    if missing:
        raise ValueError(f"{path}: value table lacks columns {sorted(missing)}; expected {VALUE_SCHEMA.names}")
    return t.column("sample_id").to_numpy().astype(np.int64), t.column("value").to_numpy().astype(np.float32)


def _writable(a) -> np.ndarray:
    # Ray hands read-only arrays; copy those (only) so torch never wraps memory it must not write.
    a = np.asarray(a)
    return a if a.flags.writeable else a.copy()


class Scorer:
    """Ray Data actor: loads the student (and teacher) once, scores batches of un-augmented samples.

    With ``decode`` (a data set dict: ``{"data_dir", "store"}``) it takes raw Parquet rows and decodes them
    itself: on CPU that saves a process hop of 4x-larger float images (bench/kcd_overhead.py). On GPU the
    decode stays in separate CPU tasks so it overlaps with inference.
    """

    def __init__(self, student_arch: str, num_classes: int, student_state, teacher_path: str, teacher_model: str,
                 value_fn: str, use_gpu: bool, threads: int = 1, decode: dict | None = None):
        import ray

        # Ray pins fractional-CPU actors to 1 OpenMP thread; the trainers idle during this pass, so use their share.
        torch.set_num_threads(max(1, int(threads)))

        from kcd_ray.condense.values import VALUE_FNS, needs_teacher
        from kcd_ray.models import build_model, load_model

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        state = ray.get(student_state) if isinstance(student_state, ray.ObjectRef) else student_state
        self.student = build_model(student_arch, num_classes)
        self.student.load_state_dict(state)
        self.student.to(self.device).eval()
        self.teacher = None
        if needs_teacher(value_fn):
            self.teacher = load_model(teacher_path, name=teacher_model or None, num_classes=num_classes).to(self.device).eval()
        self.fn = VALUE_FNS.get(value_fn)
        self.decode = None
        if decode is not None:
            from functools import partial

            from kcd_ray.data import transforms as T
            from kcd_ray.data.pipeline import eval_batch

            self.decode = partial(eval_batch, meta=T.read_meta(decode["data_dir"]), store=decode.get("store"))

    def __call__(self, batch: dict) -> dict:
        if self.decode is not None:
            batch = self.decode(batch)
        with torch.no_grad():
            x = torch.from_numpy(_writable(batch["image"])).to(self.device)
            y = torch.from_numpy(_writable(batch["label"])).to(self.device)
            zs = self.student(x).float()
            zt = self.teacher(x).float() if self.teacher is not None else None
            v = self.fn(zs, zt, y)
        return {"sample_id": np.asarray(batch["sample_id"], np.int64), "value": v.cpu().numpy().astype(np.float32)}


def offline_scores(data_dir: str, cfg, student_arch: str, num_classes: int, student_state,
                   mask_store: str | None = None, decode_in_actor: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distributed scoring of the whole training set on an actor pool: (sample ids, values), sorted by id.

    ``decode_in_actor``: None picks it (CPU actors decode their own batches, GPU actors get decoded ones).
    """
    import ray

    from kcd_ray.data.pipeline import scoring_dataset

    use_gpu = cfg.scaling.use_gpu != "false" and bool(ray.cluster_resources().get("GPU", 0))
    ref = ray.put({k: v.cpu() for k, v in student_state.items()})
    if decode_in_actor is None:
        decode_in_actor = not use_gpu
    ds = scoring_dataset(data_dir, data_cpus=cfg.scaling.data_cpus, mask_store_name=mask_store, decode=not decode_in_actor)
    scored = ds.map_batches(
        Scorer,
        fn_constructor_kwargs=dict(student_arch=student_arch, num_classes=num_classes, student_state=ref,
                                   teacher_path=cfg.distill.teacher, teacher_model=cfg.distill.teacher_model,
                                   value_fn=cfg.kcd.value_fn, use_gpu=use_gpu,
                                   threads=cfg.optim.threads or math.ceil(cfg.scaling.cpus_per_worker),
                                   decode=dict(data_dir=str(data_dir), store=mask_store) if decode_in_actor else None),
        batch_size=cfg.kcd.offline_batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.kcd.offline_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else cfg.scaling.data_cpus,
        batch_format="numpy",
    )
    ids, vals = [], []
    for b in scored.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(b["sample_id"])
        vals.append(b["value"])
    ids_a, vals_a = np.concatenate(ids), np.concatenate(vals)
    order = np.argsort(ids_a, kind="stable")
    return ids_a[order], vals_a[order]


def offline_estep(kcd, distiller, cfg, config: dict, run_dir: RunDir, epoch: int, rank: int, device) -> None:
    """Rank 0 scores all N samples on Ray Data; every rank then folds the same table into its accumulator."""
    path = value_table_path(run_dir, epoch, "offline")
    if rank == 0:
        d = distiller.module if hasattr(distiller, "module") else distiller
        ids, vals = offline_scores(config["data_dir"], cfg, cfg.model, d.student.num_classes, d.student.state_dict(),
                                   mask_store=config.get("mask_store"))
        write_value_table(run_dir, epoch, ids, vals, source="offline")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    ids, vals = read_value_table(path)
    if len(ids) != kcd.num_samples:
        raise ValueError(f"{path}: {len(ids)} values for {kcd.num_samples} training samples")
    kcd.observe(ids, vals)
    kcd.end_epoch()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def instant_values(name: str, fn, out, batch: dict, epoch: int, seed: int) -> torch.Tensor:
    """Instant values of one training batch, on the CPU.

    `random` is made a pure function of (seed, epoch, sample id), so it is the same whichever worker or
    batch order saw the sample: the ablation stays reproducible under sharding, shuffling and resume.
    """
    if name == "random":
        ids = batch["sample_id"].detach().cpu().numpy().astype(np.uint64)
        key = _splitmix64(ids ^ _splitmix64(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(epoch)))
        return torch.from_numpy((key >> np.uint64(11)).astype(np.float64) / float(1 << 53)).float()
    zt = None if out.teacher_logits is None else out.teacher_logits.detach().float()
    return fn(out.logits.detach().float(), zt, batch["label"]).cpu()
