"""The teacher-output cache on disk: key, manifest, Parquet shards, and the per-process lookup the pipeline joins.

Layout (next to the prepared data set, so every run and trial on it shares it)::

    <data_dir>/teacher_cache/<name>/manifest.json     key (what the cache is) + finished units (rows, bytes, sha256)
    <data_dir>/teacher_cache/<name>/<unit>.parquet    one shard per unit, rows sorted by sample_id

A *unit* is one view of every training sample: ``e0007`` (exact mode: the augmentation of epoch 7), ``v0003``
(views mode: the 4th of K seeded views) or ``plain`` (no augmentation: the offline E-step's input). Units are
written whole and atomically, so an interrupted build resumes at the first missing unit and a finished unit is
never recomputed; an exact cache grows by units when a longer run needs more epochs.

Augmentation is a pure function of (seed, epoch, sample_id): ``augment_uniforms``. In views mode epoch e shows
sample i its view ``view_of(i) = h(seed, e, i) mod K``; the uniforms of view v are keyed (seed, VIEW_TAG, v).

Stored: logits as fp16 (or, with ``topk`` k > 0, FKD-style: the k largest logits and their classes in fp16/int32
plus ``rest_lse``, the log-sum-exp of the other C - k logits; they come back as k exact logits and C - k equal
ones carrying the same probability mass at T = 1, which is the approximation FKD makes), and with ``feat`` the
teacher's ``feats[-1]`` (the pooled penultimate feature) in fp16.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from kcd_ray import storage
from kcd_ray.data import transforms as T

FORMAT = 2  # 2: encoded images crop from the full decoded image: older caches hold other views
VIEW_TAG = 0x56494557  # "VIEW": the views' uniform keys never collide with (seed, epoch) keys
MANIFEST = "manifest.json"
MODES = ("off", "exact", "views")


# What to do about a damaged or missing shard: both commands check the units before they use them and rebuild them.
REPAIR = ("re-run the command (a run checks the cache's units at its start and rebuilds damaged ones) or run "
          "`kcd-ray cache-teacher` with the same config")


class CacheError(ValueError):
    """A cache that must not be used: the message names the file and the field that differs."""


@dataclass(frozen=True)
class CacheSpec:
    """What a run needs from the cache (resolved by ``cache_spec``); travels to Ray Data tasks and workers."""

    dir: str
    mode: str  # exact | views
    views: int  # K (views mode), 0 otherwise
    topk: int  # 0: every logit in fp16
    feat: bool  # store feats[-1]
    seed: int
    augment: str  # resolved augmentation kind (cifar, imagenet, none)
    epochs: int  # exact mode: epochs the run trains
    plain: bool  # also the un-augmented unit (offline E-step with a teacher-based value)
    feat_shape: tuple = ()  # per-sample shape of feats[-1], from the manifest (filled after the build)
    teacher_shapes: tuple = ()  # every feature shape of the teacher (sizes the connectors without loading it)
    teacher_flops: float = 0.0  # teacher forward FLOPs per sample (the compute ledger's reference)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSpec":
        d = dict(d)
        d["feat_shape"] = tuple(d.get("feat_shape") or ())
        d["teacher_shapes"] = tuple(tuple(s) for s in d.get("teacher_shapes") or ())
        return cls(**d)

    def units(self) -> list[str]:
        return units_for(self.mode, self.epochs, self.views, self.plain)


def units_for(mode: str, epochs: int, views: int, plain: bool) -> list[str]:
    base = [f"e{e:04d}" for e in range(epochs)] if mode == "exact" else [f"v{v:04d}" for v in range(views)]
    return base + (["plain"] if plain else [])


def unit_uniform_key(unit: str, seed: int) -> Optional[tuple]:
    """The augmentation key of a unit (None: no augmentation)."""
    if unit == "plain":
        return None
    i = int(unit[1:])
    return (seed, i) if unit[0] == "e" else (seed, VIEW_TAG, i)


def view_of(ids, seed: int, epoch: int, k: int) -> np.ndarray:
    """Which of the K views sample i shows in ``epoch``: a seeded hash, uniform over 0..K-1."""
    keys = T.sample_keys(np.asarray(ids, np.int64), (seed, epoch, VIEW_TAG)).view(np.uint64)
    return (keys % np.uint64(k)).astype(np.int64)


def augment_uniforms(ids, n: int, seed: int, epoch: int, views: int = 0) -> np.ndarray:
    """float64 [B, n]: sample i's augmentation draws in ``epoch`` (views > 0: those of its view that epoch)."""
    ids = np.asarray(ids, np.int64)
    if not views:
        return T.sample_uniforms(ids, n, (seed, epoch))
    v = view_of(ids, seed, epoch, views)
    u = np.empty((len(ids), n), np.float64)
    for j in np.unique(v).tolist():
        sel = v == j
        u[sel] = T.sample_uniforms(ids[sel], n, (seed, VIEW_TAG, j))
    return u


# --------------------------------------------------------------------------- key and manifest


def file_sha256(path) -> str:
    h = hashlib.sha256()
    if storage.is_uri(path):  # a teacher in an object store: hash its local working copy
        path = storage.fetch(str(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(*, teacher_sha256: str, teacher_model: str, meta: dict, num_classes: int, spec: CacheSpec,
              teacher_kwargs: Optional[dict] = None, teacher_taps: tuple = ()) -> dict:
    """Everything the cached values depend on; a manifest whose key differs in any field is refused.

    The teacher is its file's bytes (its weights: ``teacher_sha256``), its architecture and, when set, its
    constructor arguments and (for a cached ``feats[-1]``) its own taps; unset ones stay out of the key, so caches
    built before they existed still match."""
    key = {"format": FORMAT, "teacher_sha256": teacher_sha256, "teacher_model": teacher_model or "",
           "data_checksum": meta["splits"]["train"].get("checksum", ""),
           "num_train": int(meta["splits"]["train"]["num_rows"]), "num_classes": int(num_classes),
           "augment": spec.augment, "seed": int(spec.seed), "mode": spec.mode, "views": int(spec.views),
           "logits": "fp16" if not spec.topk else f"top{spec.topk}", "feat": bool(spec.feat)}
    if teacher_kwargs:
        key["teacher_kwargs"] = json.dumps(dict(teacher_kwargs), sort_keys=True, default=str)
    if teacher_taps and spec.feat:
        key["teacher_taps"] = list(teacher_taps)
    return key


def teacher_cache_key(cfg, meta: dict, spec: CacheSpec) -> dict:
    """The cache key of a run's teacher (``distill.teacher`` hashed, wherever it is stored)."""
    d = cfg.distill
    return cache_key(teacher_sha256=file_sha256(d.teacher), teacher_model=d.teacher_model, meta=meta,
                     num_classes=int(meta["num_classes"]), spec=spec, teacher_kwargs=d.teacher_kwargs,
                     teacher_taps=tuple(d.teacher_taps))


def cache_folder(spec: CacheSpec, data_dir, key: dict) -> str:
    """``distill.cache_dir`` (a path or an object-store URI), else beside the prepared data: in its object store
    when the data set is a working copy of one, so that the workers of every node read the same cache."""
    if spec.dir:
        return storage.absolute(spec.dir)
    return default_dir(storage.staged_from(data_dir) or Path(data_dir).resolve(), key)


def resolve_cache(spec: CacheSpec, cfg, data_dir) -> tuple[CacheSpec, dict, dict]:
    """(the spec with its folder, the key the folder's manifest must hold, the data set's meta) for a run's
    config ``cfg`` (its teacher: ``teacher_cache_key``)."""
    from kcd_ray.data import load_meta

    meta = load_meta(Path(data_dir))
    key = teacher_cache_key(cfg, meta, spec)
    return replace(spec, dir=cache_folder(spec, data_dir, key)), key, meta


def unit_problems(folder, manifest: dict, units, deep: bool = False) -> dict[str, str]:
    """unit -> what is wrong with its shard, for the ``units`` the manifest lists: missing or of another size
    (one listing of the folder, always), or another sha256 (read when ``deep``, or when the shard changed after
    the manifest was last written: a shard is always written before the manifest that lists it)."""
    listed = [u for u in units if u in manifest.get("units", {})]
    if not listed:
        return {}
    stats = storage.list_stats(str(folder))
    manifest_time = stats.get(MANIFEST, (0, 0))[1]
    out = {}
    for u in listed:
        entry, rel = manifest["units"][u], f"{u}.parquet"
        if rel not in stats:
            out[u] = "missing shard listed in the manifest"
        elif stats[rel][0] != entry["bytes"]:
            out[u] = f"{stats[rel][0]} bytes, the manifest says {entry['bytes']} (truncated or rewritten)"
        elif (deep or stats[rel][1] > manifest_time) and \
                hashlib.sha256(storage.read_bytes(storage.join(str(folder), rel))).hexdigest() != entry["sha256"]:
            out[u] = "sha256 differs from the manifest (damaged)"
    return out


def default_dir(data_dir, key: dict) -> str:
    """``<data set>/teacher_cache/<key digest>``: beside the prepared data, in its object store when it has one."""
    name = (f"t{key['teacher_sha256'][:10]}-d{key['data_checksum'][:10]}-{key['augment']}-s{key['seed']}-"
            f"{key['mode']}{key['views'] or ''}-{key['logits']}{'-feat' if key['feat'] else ''}")
    return storage.join(str(data_dir), "teacher_cache", name)


# A cache folder is a path or an object-store URI (``kcd_ray.storage``): every file is one atomic write (rename or
# single PUT) and the manifest is written after the shards it lists, so a reader never sees a half-built unit.


def read_manifest(folder) -> Optional[dict]:
    p = storage.join(str(folder), MANIFEST)
    if not storage.exists(p):
        return None
    try:
        m = json.loads(storage.read_text(p))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{p}: damaged manifest ({e}); delete the folder to rebuild the cache") from None
    if not isinstance(m, dict) or not isinstance(m.get("key"), dict) or not isinstance(m.get("units"), dict):
        raise CacheError(f"{p}: manifest lacks 'key' or 'units'; delete the folder to rebuild the cache")
    return m


def write_manifest(folder, manifest: dict) -> None:
    storage.write_text(storage.join(str(folder), MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def check_manifest(manifest: dict, key: dict, folder) -> None:
    """One-line CacheError naming the first field where the cache differs from what the run needs."""
    have = manifest["key"]
    for field, want in key.items():
        if have.get(field) != want:
            raise CacheError(f"{storage.join(str(folder), MANIFEST)}: {field} differs "
                             f"(cache {have.get(field)!r}, this run {want!r}); it is not used: point "
                             "distill.cache_dir elsewhere or delete the folder")


# --------------------------------------------------------------------------- shards


def _fixed(a: np.ndarray):
    import pyarrow as pa

    a = np.ascontiguousarray(a)
    width = a.dtype.itemsize * int(np.prod(a.shape[1:]))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(a), [None, pa.py_buffer(a.tobytes())])


def _unfixed(col, dtype, shape) -> np.ndarray:
    arr = col.combine_chunks()
    width = arr.type.byte_width
    buf = arr.buffers()[1]
    raw = np.frombuffer(buf, np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return raw.view(dtype).reshape(len(arr), *shape)


def shard_table(ids: np.ndarray, logits: np.ndarray, feat: Optional[np.ndarray], topk: int):
    """A unit's rows (sorted by sample id) as a pyarrow table."""
    import pyarrow as pa

    order = np.argsort(ids, kind="stable")
    ids, logits = np.asarray(ids, np.int64)[order], np.asarray(logits, np.float32)[order]
    cols = {"sample_id": pa.array(ids)}
    if topk:
        idx = np.argsort(-logits, axis=1, kind="stable")[:, :topk]
        top = np.take_along_axis(logits, idx, axis=1)
        rest = np.ones_like(logits, bool)
        np.put_along_axis(rest, idx, False, axis=1)
        masked = np.where(rest, logits, -np.inf)
        m = masked.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(masked - m).sum(axis=1, keepdims=True)))[:, 0]
        cols.update(top_values=_fixed(top.astype(np.float16)), top_index=_fixed(idx.astype(np.int32)),
                    rest_lse=pa.array(lse.astype(np.float32)))
    else:
        cols["logits"] = _fixed(logits.astype(np.float16))
    if feat is not None:
        cols["feat"] = _fixed(np.asarray(feat, np.float32)[order].reshape(len(ids), -1).astype(np.float16))
    return pa.table(cols)


def write_shard(folder, unit: str, table) -> dict:
    """Atomic write; returns the manifest entry (rows, bytes, sha256) that later reads check."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none")
    data = sink.getvalue()
    storage.write_bytes(storage.join(str(folder), f"{unit}.parquet"), data)
    return {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class UnitArrays:
    """One unit in memory: sorted ids, fp16 logits [N, C] (dense, top-k expanded) and fp16 feats [N, D] or None."""

    def __init__(self, ids: np.ndarray, logits: np.ndarray, feat: Optional[np.ndarray]):
        self.ids, self.logits, self.feat = ids, logits, feat

    def rows(self, ids: np.ndarray, where: str) -> np.ndarray:
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        bad = self.ids[pos] != ids
        if bad.any():
            raise CacheError(f"{where}: no cached output for sample_id {int(ids[bad][0])}")
        return pos


def read_unit(folder, unit: str, entry: Optional[dict], num_classes: int) -> UnitArrays:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = storage.join(str(folder), f"{unit}.parquet")
    if entry is None:
        raise CacheError(f"{storage.join(str(folder), MANIFEST)}: unit {unit!r} is not built; rebuild with "
                         "`kcd-ray cache-teacher`")
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CacheError(f"{path}: missing shard listed in the manifest; {REPAIR}") from None
    if len(data) != entry["bytes"]:
        raise CacheError(f"{path}: bytes differ (file {len(data)}, manifest {entry['bytes']}): truncated or "
                         f"rewritten shard; {REPAIR}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CacheError(f"{path}: sha256 differs from the manifest: damaged shard; {REPAIR}")
    table = pq.read_table(pa.BufferReader(data))
    ids = table.column("sample_id").to_numpy()
    if "logits" in table.column_names:
        logits = _unfixed(table.column("logits"), np.float16, (num_classes,))
    else:
        logits = expand_topk(_unfixed(table.column("top_values"), np.float16, (-1,)),
                             _unfixed(table.column("top_index"), np.int32, (-1,)),
                             table.column("rest_lse").to_numpy(), num_classes)
    feat = _unfixed(table.column("feat"), np.float16, (-1,)) if "feat" in table.column_names else None
    return UnitArrays(ids, logits, feat)


def expand_topk(top: np.ndarray, idx: np.ndarray, rest_lse: np.ndarray, num_classes: int) -> np.ndarray:
    """Dense fp16 logits: the k kept logits, and the other C - k equal to rest_lse - log(C - k)."""
    k = top.shape[1]
    fill = (rest_lse.astype(np.float32) - np.log(max(num_classes - k, 1)))[:, None]
    out = np.repeat(fill, num_classes, axis=1)
    np.put_along_axis(out, idx.astype(np.int64), top.astype(np.float32), axis=1)
    return out.astype(np.float16)


# --------------------------------------------------------------------------- the join


class TeacherLookup:
    """Per process: the units a batch needs, loaded once (LRU), and the teacher columns of a batch's rows."""

    def __init__(self, spec: CacheSpec, num_classes: int, max_units: Optional[int] = None):
        self.spec, self.num_classes = spec, int(num_classes)
        self.max_units = max_units or (spec.views + 2 if spec.mode == "views" else 3)
        self._units: OrderedDict = OrderedDict()
        self._manifest: Optional[dict] = None

    def unit(self, name: str) -> UnitArrays:
        if name in self._units:
            self._units.move_to_end(name)
            return self._units[name]
        if self._manifest is None or name not in self._manifest["units"]:
            self._manifest = read_manifest(self.spec.dir) or {"units": {}}
        arrays = read_unit(self.spec.dir, name, self._manifest["units"].get(name), self.num_classes)
        self._units[name] = arrays
        while len(self._units) > self.max_units:
            self._units.popitem(last=False)
        return arrays

    def units_of(self, ids: np.ndarray, epoch: int) -> np.ndarray:
        """Per row, the unit index it shows this epoch (exact: the epoch; views: its view)."""
        if self.spec.mode == "views":
            return view_of(ids, self.spec.seed, epoch, self.spec.views)
        return np.full(len(ids), int(epoch), np.int64)

    def columns(self, ids, epoch: int, missing: Optional[np.ndarray] = None, plain: bool = False) -> dict:
        """``t_logits`` fp16 [B, C], ``t_feat`` fp16 [B, D] (when stored), ``t_missing`` bool [B]: rows whose
        image is not the cached view (a KCD blend): the worker runs the teacher on those rows only."""
        ids = np.asarray(ids, np.int64)
        logits = np.zeros((len(ids), self.num_classes), np.float16)
        feat = None
        which = np.zeros(len(ids), np.int64) if plain else self.units_of(ids, epoch)
        for j in np.unique(which).tolist():
            sel = which == j
            name = "plain" if plain else (f"v{j:04d}" if self.spec.mode == "views" else f"e{j:04d}")
            u = self.unit(name)
            pos = u.rows(ids[sel], f"{self.spec.dir}/{name}.parquet")
            logits[sel] = u.logits[pos]
            if u.feat is not None:
                if feat is None:
                    feat = np.zeros((len(ids), u.feat.shape[1]), np.float16)
                feat[sel] = u.feat[pos]
        out = {"t_logits": logits,
               "t_missing": np.zeros(len(ids), bool) if missing is None else np.asarray(missing, bool)}
        if feat is not None and self.spec.feat:
            out["t_feat"] = feat
        return out
