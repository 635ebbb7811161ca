"""Per-epoch shuffle of the train pipeline: a full permutation seeded by (seed, epoch), epochs served by the MaskStore.

The Ray tests share one small data set (4096 rows of 8x8x3 raw pixels in four 1024-row files) and one
local Ray. The expected order of an epoch is computed by hand: ``argsort(sample_keys(kept ids, (seed,
epoch, ORDER)))``, and a sample's expected image from ``sample_uniforms(id, k, (seed, epoch))``. The
"full" shuffle has two back ends that must agree row for row: the split cached in the object store
(small splits, the default here) and Ray Data's sort (large splits; forced with ``FULL_CACHE_MAX_BYTES=0``).
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kcd_ray.data import transforms as T

N, BLOCK, BATCH, SEED = 4096, 1024, 64, 7
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def make_prepared(root: Path, n_train: int, rows_per_file: int, shape=(8, 8, 3), seed=0):
    """A prepared folder of raw images (train split only matters here); returns (folder, (labels, uint8 NHWC))."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n_train).astype(np.int64)
    imgs = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
    for split, n in (("train", n_train), ("test", 8)):
        (root / split).mkdir(parents=True)
        for k, s in enumerate(range(0, n, rows_per_file)):
            e = min(n, s + rows_per_file)
            t = pa.table({"sample_id": pa.array(np.arange(s, e), pa.int64()), "label": pa.array(labels[s:e]),
                          "image": pa.array([imgs[i].tobytes() for i in range(s, e)], pa.binary())})
            pq.write_table(t, root / split / f"part-{k:05d}.parquet", row_group_size=256)
    meta = {"format_version": 1, "name": "fake", "source": "test", "num_classes": 5, "class_names": list("abcde"),
            "image_shape": list(shape), "encoding": "raw", "mean": MEAN, "std": STD,
            "splits": {"train": {"num_rows": n_train, "checksum": ""}, "test": {"num_rows": 8, "checksum": ""}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root, (labels, imgs)


# --------------------------------------------------------------------------- no Ray


def test_sample_keys_are_a_keyed_bijection():
    ids = np.arange(50_000)
    k = T.sample_keys(ids, (SEED, 3, 1))
    assert k.dtype == np.int64 and len(np.unique(k)) == len(ids)  # no ties: the order is exact
    np.testing.assert_array_equal(k[100:200], T.sample_keys(ids[100:200], (SEED, 3, 1)))  # per id, not per batch
    assert not np.array_equal(np.argsort(k), np.argsort(T.sample_keys(ids, (SEED, 4, 1))))
    # uniform over int64: equal-width ranges (the sort boundaries) hold equal shares
    counts = np.histogram(k.astype(np.float64), bins=8, range=(-2.0**63, 2.0**63))[0]
    assert counts.min() > 0.9 * len(ids) / 8 and counts.max() < 1.1 * len(ids) / 8
    # negative epochs (an initialisation stage) are ordinary keys
    assert len(np.unique(T.sample_keys(ids[:1000], (SEED, -1, 1)))) == 1000


def test_shuffle_modes_and_renames():
    from kcd_ray.config import ConfigError, load_config
    from kcd_ray.ray_layer.full_shuffle import sort_boundaries
    from kcd_ray.ray_layer.pipeline import SHUFFLES, _resolve_shuffle

    assert _resolve_shuffle("auto") == "full" and _resolve_shuffle("block_local") == "block_local"
    with pytest.raises(ValueError, match="renamed 'block_local_files'"):
        _resolve_shuffle("files")
    with pytest.raises(ValueError, match="not one of"):
        _resolve_shuffle("rows")
    assert load_config(base={"data": {"shuffle": "block_local"}}).data.shuffle == "block_local"
    assert load_config().data.shuffle == "auto" and "full" in SHUFFLES
    with pytest.raises(ConfigError):
        load_config(base={"data": {"shuffle": "blocks"}})
    b = sort_boundaries(4)
    assert len(b) == 3 and b[1] == 0 and all(-2**63 < x < 2**63 for x in b)


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def data(ray_session, tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("shuffle") / "ds", n_train=N, rows_per_file=BLOCK, seed=4)


@pytest.fixture(params=["cached", "sorted"])
def backend(request, monkeypatch):
    from kcd_ray.ray_layer import pipeline

    if request.param == "sorted":
        monkeypatch.setattr(pipeline, "FULL_CACHE_MAX_BYTES", 0)
    return request.param


@pytest.fixture()
def store(ray_session):
    from kcd_ray.ray_layer.mask_store import get_mask_store

    name = f"test_shuffle_{uuid.uuid4().hex[:8]}"
    get_mask_store(name, create=True)
    return name


def _run(ds, batch_size=BATCH):
    """One execution: the minibatches' ids (in order) and the images by id."""
    ids, imgs = [], []
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        ids.append(b["sample_id"])
        imgs.append(b["image"])
    return ids, np.concatenate(imgs)


def _order(ids, epoch):
    from kcd_ray.data.row_maps import ORDER

    ids = np.asarray(ids)
    return ids[np.argsort(T.sample_keys(ids, (SEED, epoch, ORDER)))]


def _expected_images(ids, epoch, arrays):
    meta = {"image_shape": [8, 8, 3], "encoding": "raw", "mean": MEAN, "std": STD}
    u = T.sample_uniforms(ids, T.n_uniforms("cifar"), (SEED, epoch))
    return T.train_transform(arrays[1][ids], meta, "cifar", uniforms=u).numpy()


def _hypergeom_tail(pop: int, k: int, n: int, t: int) -> float:
    """P(X >= t), X ~ overlap of two uniformly random k- and n-subsets of pop items."""
    return sum(math.comb(k, i) * math.comb(pop - k, n - i) for i in range(t, min(k, n) + 1)) / math.comb(pop, n)


@pytest.mark.ray
def test_full_shuffle_mixes_blocks_and_is_seeded_by_seed_and_epoch(data, store):
    """(a) ids from different 1024-row blocks share minibatches; (b) epochs' first batches overlap by chance
    only; (c) the order and the crops are a pure function of (seed, epoch): the same after other epochs
    ran and in a newly built dataset; a different epoch gives a different order."""
    from kcd_ray.ray_layer.mask_store import set_epoch
    from kcd_ray.ray_layer.pipeline import train_dataset

    d, arrays = data
    ds = train_dataset(d, augment="cifar", seed=SEED, mask_store_name=store, data_cpus=0.5)
    runs = {}
    for e in (0, 1, 2):
        set_epoch(store, e)
        runs[e] = _run(ds)
    pairs = set()
    for e, (batches, imgs) in runs.items():
        flat = np.concatenate(batches)
        np.testing.assert_array_equal(flat, _order(np.arange(N), e))  # exactly the (seed, epoch) permutation
        np.testing.assert_array_equal(imgs, _expected_images(flat, e, arrays))
        blocks_per_batch = [len(np.unique(b // BLOCK)) for b in batches]
        assert np.mean(blocks_per_batch) > 3.5  # uniform: P(a 64-row batch misses one of 4 blocks) ~ 4e-8
        for b in batches:
            u = np.unique(b // BLOCK)
            pairs |= {(int(x), int(y)) for x in u for y in u if x < y}
    assert pairs == {(x, y) for x in range(4) for y in range(4) if x < y}
    # (b) two minibatches (128 ids) of two epochs: overlap ~ hypergeometric(4096, 128, 128), mean 4
    first = {e: np.concatenate(runs[e][0][:2]) for e in runs}
    limit = next(t for t in range(129) if _hypergeom_tail(N, 128, 128, t) < 1e-6)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert len(np.intersect1d(first[a], first[b])) < limit, (a, b, limit)
    # (c) epoch 1 again, on the same plan after other epochs ran and on a newly built dataset
    set_epoch(store, 1)
    again = _run(ds)
    fresh = _run(train_dataset(d, augment="cifar", seed=SEED, mask_store_name=store, data_cpus=0.5))
    for batches, imgs in (again, fresh):
        np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(runs[1][0]))
        np.testing.assert_array_equal(imgs, runs[1][1])
    assert not np.array_equal(np.concatenate(runs[0][0]), np.concatenate(runs[1][0]))
    # the former block-local shuffle, for contrast: a minibatch never spans more than two 1024-row files
    set_epoch(store, 0)
    local, local_imgs = _run(train_dataset(d, augment="cifar", seed=SEED, mask_store_name=store, data_cpus=0.5,
                                           shuffle="block_local"))
    assert max(len(np.unique(b // BLOCK)) for b in local) <= 2
    flat = np.concatenate(local)
    # same (seed, epoch, id) -> the same crop, whatever the shuffle mode
    np.testing.assert_array_equal(local_imgs[np.argsort(flat)], runs[0][1][np.argsort(np.concatenate(runs[0][0]))])


@pytest.mark.ray
def test_mask_keeps_each_kept_id_once_and_augmentation_ignores_the_mask_version(data, store, backend):
    """(d) with half the rows kept: each kept id exactly once per epoch, in the (seed, epoch) order of the kept
    set, no dropped id; (f) a sample's crop in epoch e is the same under mask versions 0, 1 and 2."""
    from kcd_ray.ray_layer.mask_store import publish_mask, read_state, set_epoch
    from kcd_ray.ray_layer.pipeline import train_dataset

    d, arrays = data
    ds = train_dataset(d, augment="cifar", seed=SEED, mask_store_name=store, data_cpus=0.5)
    set_epoch(store, 5)
    full_ids, full_imgs = _run(ds)
    full_ids = np.concatenate(full_ids)
    by_id = full_imgs[np.argsort(full_ids)]
    kept = np.sort(np.random.default_rng(0).choice(N, N // 2, replace=False))
    for version, keep in ((1, kept), (2, kept[::2])):
        publish_mask(store, version, keep, num_samples=N)
        assert read_state(store).version == version and read_state(store).epoch == 5
        batches, imgs = _run(ds)
        got = np.concatenate(batches)
        np.testing.assert_array_equal(got, _order(keep, 5))  # every kept id once, nothing else
        np.testing.assert_array_equal(imgs, by_id[got])  # (f) the mask version does not change a crop
    # the epoch still moves the kept set's order
    set_epoch(store, 6)
    np.testing.assert_array_equal(np.concatenate(_run(ds)[0]), _order(kept[::2], 6))


@pytest.mark.ray
# the sorted back end's variant (~11 s) is slow; its serving of the kept set is checked in the default run by
# test_mask_keeps_each_kept_id_once_and_augmentation_ignores_the_mask_version[sorted]
@pytest.mark.parametrize("backend", ["cached", pytest.param("sorted", marks=pytest.mark.slow)], indirect=True)
def test_equal_streaming_split_serves_the_permuted_kept_set(data, store, backend):
    """(e) two consumers of streaming_split(2, equal=True), as Ray Train's DataConfig splits "train": equal
    shares that together are the whole kept set, padded by ``-len(kept) % 2`` repeated row(s) when the store
    says the epoch is split two ways (nothing dropped; the sorted back end drops instead); the same shares, in the
    same order, when the epoch is served again."""
    from kcd_ray.ray_layer.mask_store import publish_mask, set_epoch
    from kcd_ray.ray_layer.pipeline import train_dataset

    d, _ = data
    kept = np.arange(1, N, 2)[:1501]  # an odd count: one row is repeated so that equal=True drops none
    publish_mask(store, 1, kept, num_samples=N)
    ds = train_dataset(d, augment="none", seed=SEED, mask_store_name=store, data_cpus=0.5)
    seen = []
    for epoch in (-1, -1):  # negative epochs (an initialisation stage) are ordinary epochs
        set_epoch(store, epoch, world=2)
        shards = ds.streaming_split(2, equal=True)
        got, errors = {}, []

        def consume(i, got=got, shards=shards, errors=errors):  # this epoch's, should a join time out
            try:
                got[i] = np.concatenate([b["sample_id"] for b in shards[i].iter_batches(batch_size=BATCH)])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join(timeout=300) for t in threads]
        assert not errors and len(got) == 2, errors
        union = np.concatenate([got[0], got[1]])
        if backend == "cached":
            assert len(got[0]) == len(got[1]) == (len(kept) + 1) // 2
            np.testing.assert_array_equal(np.unique(union), kept)  # every kept row, one of them twice
        else:  # Ray's sort (large splits) is not padded: equal=True drops len(kept) % 2 rows
            assert len(got[0]) == len(got[1]) == len(kept) // 2
            assert len(np.unique(union)) == len(kept) - 1 and np.isin(union, kept).all()
        seen.append(got)
    for i in range(2):
        np.testing.assert_array_equal(seen[0][i], seen[1][i])


@pytest.mark.ray
def test_full_shuffle_needs_no_whole_free_cpu(data, ray_session):
    """With 1.5 of the 2 CPUs held (two Tune trials' drivers and workers), the default (cached) "full" shuffle
    still runs: its tasks take ``data_cpus``. (Ray's sort, the large-split back end, needs a whole CPU.)"""
    from kcd_ray.ray_layer.pipeline import train_dataset

    d, _ = data
    ds = train_dataset(d, augment="cifar", seed=SEED, data_cpus=0.25)

    @ray_session.remote(num_cpus=1.5)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    try:
        ray_session.get(hog.ping.remote())
        got = {}
        t = threading.Thread(target=lambda: got.update(ids=np.concatenate(_run(ds)[0])), daemon=True)
        t.start()
        t.join(timeout=120)
        assert "ids" in got, "the full shuffle did not finish with 0.5 CPU free"
        np.testing.assert_array_equal(got["ids"], _order(np.arange(N), 0))
    finally:
        ray_session.kill(hog)


@pytest.mark.ray
def test_seed_none_still_serves_each_row_once(data):
    from kcd_ray.ray_layer.pipeline import train_dataset

    d, _ = data
    ids = np.concatenate(_run(train_dataset(d, augment="none", seed=None, data_cpus=0.5))[0])
    np.testing.assert_array_equal(np.sort(ids), np.arange(N))
    assert not np.array_equal(ids, _order(np.arange(N), 0))


@pytest.mark.ray
def test_set_epoch_and_read_state(store):
    from kcd_ray.ray_layer.mask_store import get_mask_store, publish_mask, read_mask, read_state, set_epoch

    s = read_state(store)
    assert (s.version, s.kept, s.overlay, s.epoch) == (0, None, None, 0)
    set_epoch(get_mask_store(store, create=False), -3)  # a handle works too
    assert read_state(store).epoch == -3
    set_epoch(store, np.int64(2))
    publish_mask(store, 1, [1, 3], num_samples=5)
    s = read_state(store)
    assert s.epoch == 2 and s.version == 1 and s.kept.tolist() == [False, True, False, True, False]
    v, kept, overlay = read_mask(store)  # the 3-tuple API is unchanged
    assert v == 1 and kept is s.kept and overlay is None  # cached per version: no second fetch
    with pytest.raises(TypeError):
        set_epoch(store, 1.5)
