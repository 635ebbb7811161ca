"""The offline E-step on Ray: a Ray Data batch-inference pass on an actor pool over ALL N training samples
(condensed-away ones included, no augmentation) with the current student (and the teacher when the value
function needs it). The condenser hook (``kcd_ray.engine.condenser``) calls it through ``RayServices`` on
rank 0 and hands the table to the other ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kcd_ray.condense.values import make_context
from kcd_ray.ray_layer.resources import scorer_resources


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
                 value_fn: str, use_gpu: bool, context: dict, threads: int = 1, decode: dict | None = None,
                 teacher_cache: dict | None = None, student_kwargs: dict | None = None,
                 teacher_kwargs: dict | None = None):
        import ray

        # Ray pins fractional-CPU actors to 1 OpenMP thread; the trainers idle during this pass, so use their share.
        torch.set_num_threads(max(1, int(threads)))

        from kcd_ray.condense.values import VALUE_FNS, needs_teacher
        from kcd_ray.models import build_model, load_model

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        state = ray.get(student_state) if isinstance(student_state, ray.ObjectRef) else student_state
        self.student = build_model(student_arch, num_classes, kwargs=student_kwargs)
        self.student.load_state_dict(state)
        self.student.to(self.device).eval()
        self.teacher = None
        self.lookup = None  # teacher-output cache: the teacher's outputs on the un-augmented images ("plain")
        if needs_teacher(value_fn) and teacher_cache is not None:
            from kcd_ray.cache.store import CacheSpec, TeacherLookup

            self.lookup = TeacherLookup(CacheSpec.from_dict(teacher_cache), num_classes)
        self.load_teacher = lambda: load_model(teacher_path, name=teacher_model or None, num_classes=num_classes,
                                               kwargs=teacher_kwargs).to(self.device).eval()
        if needs_teacher(value_fn) and self.lookup is None:
            self.teacher = self.load_teacher()
        self.fn = VALUE_FNS.get(value_fn)
        self.context = dict(context)  # epoch, seed, T, value_T: the same value function as online
        self.decode = None
        if decode is not None:
            from functools import partial

            from kcd_ray.data import transforms as T
            from kcd_ray.ray_layer.pipeline import eval_batch

            self.decode = partial(eval_batch, meta=T.read_meta(decode["data_dir"]), store=decode.get("store"),
                                  blended=self.lookup is not None)

    def __call__(self, batch: dict) -> dict:
        if self.decode is not None:
            batch = self.decode(batch)
        with torch.no_grad():
            x = torch.from_numpy(_writable(batch["image"])).to(self.device)
            y = torch.from_numpy(_writable(batch["label"])).to(self.device)
            zs = self.student(x).float()
            ids = np.asarray(batch["sample_id"], np.int64)
            zt = (self._teacher_logits(x, ids, batch.get("blended"))
                  if self.teacher is not None or self.lookup is not None else None)
            v = self.fn(zs, zt, y, make_context(ids, **self.context))
        return {"sample_id": np.asarray(batch["sample_id"], np.int64), "value": v.cpu().numpy().astype(np.float32)}


    def _teacher_logits(self, x: torch.Tensor, ids: np.ndarray, blended) -> torch.Tensor:
        """The teacher's logits: cached (blended rows, images the cache never saw, through the teacher), or live."""
        if self.lookup is None:
            return self.teacher(x).float()
        z = torch.from_numpy(self.lookup.columns(ids, 0, plain=True)["t_logits"]).float().to(self.device)
        if blended is not None and np.asarray(blended).any():
            if self.teacher is None:
                self.teacher = self.load_teacher()
            rows = torch.from_numpy(np.flatnonzero(np.asarray(blended))).to(self.device)
            z[rows] = self.teacher(x[rows]).float()
        return z


def offline_scores(data_dir: str, cfg, student_state: dict, *, epoch: int, mask_store: str | None = None,
                   decode_in_actor: bool | None = None,
                   teacher_cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distributed scoring of the whole training set on an actor pool: (sample ids, values), sorted by id.

    ``decode_in_actor``: None picks it (CPU actors decode their own batches, GPU actors get decoded ones).
    """
    import ray

    from kcd_ray.data import load_meta
    from kcd_ray.distill.temperature import epoch_temperature
    from kcd_ray.ray_layer.pipeline import scoring_dataset

    res = scorer_resources(cfg.scaling)
    gpu = res["num_gpus"] > 0
    ref = ray.put({k: v.cpu() for k, v in student_state.items()})
    if decode_in_actor is None:
        decode_in_actor = not gpu
    T = epoch_temperature(cfg.distill.temperature, cfg.optim.epochs, epoch)
    context = dict(epoch=int(epoch), seed=cfg.kcd.seed, T=T, value_T=cfg.kcd.value_T)
    if teacher_cache is not None and not teacher_cache.get("plain"):
        teacher_cache = None  # built without the un-augmented unit: the scorers run the teacher
    ds = scoring_dataset(data_dir, data_cpus=cfg.scaling.data_cpus, mask_store_name=mask_store,
                         decode=not decode_in_actor, blended=teacher_cache is not None)
    scored = ds.map_batches(
        Scorer,
        fn_constructor_kwargs=dict(student_arch=cfg.model, num_classes=int(load_meta(data_dir)["num_classes"]),
                                   student_state=ref, teacher_path=cfg.distill.teacher,
                                   teacher_model=cfg.distill.teacher_model, value_fn=cfg.kcd.value_fn, use_gpu=gpu,
                                   student_kwargs=cfg.model_kwargs, teacher_kwargs=cfg.distill.teacher_kwargs,
                                   context=context,
                                   threads=cfg.optim.threads or math.ceil(cfg.scaling.cpus_per_worker),
                                   decode=dict(data_dir=str(data_dir), store=mask_store) if decode_in_actor else None,
                                   teacher_cache=teacher_cache),
        batch_size=cfg.kcd.offline_batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.kcd.offline_actors),
        **res,
        batch_format="numpy",
    )
    ids, vals = [], []
    for b in scored.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(b["sample_id"])
        vals.append(b["value"])
    ids_a, vals_a = np.concatenate(ids), np.concatenate(vals)
    order = np.argsort(ids_a, kind="stable")
    return ids_a[order], vals_a[order]
