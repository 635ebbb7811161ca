"""Ray Data pipeline, mask store and blend overlay (kcd_ray.ray_layer.pipeline, kcd_ray.ray_layer.mask_store,
kcd_ray.data.blend, kcd_ray.data.transforms).

Prepared folders are fabricated here with pyarrow (meta.json + train/test Parquet with an extra
``is_duplicate`` column), so these tests do not depend on the Parquet conversion code.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kcd_ray.condense.vaks import blend_uint8
from kcd_ray.data import transforms as T
from kcd_ray.data.blend import load_overlay, overlay_ids, overlay_lookup, prune_overlays
from kcd_ray.data.blend_writer import write_blend_overlay

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def make_prepared(root: Path, n_train=40, n_test=12, shape=(8, 8, 3), encoding="raw", rows_per_file=16, seed=0):
    """A prepared data set folder; returns (folder, {split: (labels, uint8 images NHWC)})."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 5, n).astype(np.int64)
        imgs = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        data[split] = (labels, imgs)
        (root / split).mkdir(parents=True)
        for k, s in enumerate(range(0, n, rows_per_file)):
            e = min(n, s + rows_per_file)
            col = [imgs[i].tobytes() if encoding == "raw" else _png(imgs[i]) for i in range(s, e)]
            t = pa.table({"sample_id": pa.array(np.arange(s, e), pa.int64()), "label": pa.array(labels[s:e]),
                          "image": pa.array(col, pa.binary()), "is_duplicate": pa.array(np.zeros(e - s, bool))})
            pq.write_table(t, root / split / f"part-{k:05d}.parquet", row_group_size=8)
    meta = {"format_version": 1, "name": "fake", "source": "test", "num_classes": 5, "class_names": list("abcde"),
            "image_shape": list(shape), "encoding": encoding, "mean": MEAN, "std": STD,
            "splits": {s: {"num_rows": len(data[s][0]), "checksum": ""} for s in data}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root, data


def _norm(x_uint8: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(x_uint8).permute(0, 3, 1, 2).float() / 255.0
    return T.normalize(x, MEAN, STD).numpy()


# --------------------------------------------------------------------------- transforms (no Ray)


def _u8(chw: torch.Tensor) -> np.ndarray:
    return np.rint(chw.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)


def test_cifar_crop_and_flip_match_a_per_sample_reference():
    rng = np.random.default_rng(1)
    x = rng.integers(1, 256, (64, 12, 10, 3), dtype=np.uint8)  # no zeros: padding is recognisable
    g = torch.Generator().manual_seed(3)
    u = torch.rand(64, T.n_uniforms("cifar"), generator=g, dtype=torch.float64)
    out = T.augment_batch(x, "cifar", uniforms=u)
    assert out.shape == (64, 3, 12, 10) and out.dtype == torch.float32
    dy, dx, flip = T.cifar_params(u)
    assert dy.min() >= 0 and dy.max() <= 8 and dx.min() >= 0 and dx.max() <= 8
    assert 0 < int(flip.sum()) < 64
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(64):
        ref = padded[i, dy[i]:dy[i] + 12, dx[i]:dx[i] + 10]
        if flip[i]:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(_u8(out[i]), ref)
    # extreme uniforms: top-left corner of the padded image, unflipped -> 4 zero rows and columns
    corner = T.augment_batch(x[:1], "cifar", uniforms=np.array([[0.0, 0.0, 0.9]]))
    assert (corner[0, :, :4, :] == 0).all() and (corner[0, :, :, :4] == 0).all()
    np.testing.assert_array_equal(_u8(corner[0, :, 4:, 4:]), x[0, :8, :6])
    # the fused uint8 -> normalised path the pipeline uses equals augment + normalize
    meta = {"image_shape": [12, 10, 3], "encoding": "raw", "mean": MEAN, "std": STD}
    np.testing.assert_allclose(T.train_transform(x, meta, "cifar", uniforms=u).numpy(),
                               T.normalize(out.clone(), MEAN, STD).numpy(), rtol=1e-5, atol=1e-5)
    # a generator gives reproducible draws
    a = T.augment_batch(x, "cifar", torch.Generator().manual_seed(7))
    b = T.augment_batch(x, "cifar", torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_random_resized_crop_boxes_and_identity():
    h, w = 20, 16
    u = torch.rand(500, T.n_uniforms("imagenet"), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    boxes, flip = T.rrc_boxes(u, h, w)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert ((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= w).all()
            and (boxes[:, 3] <= h).all())
    assert (bw >= 1).all() and (bh >= 1).all() and 0.3 < flip.float().mean() < 0.7
    area = bw * bh / (h * w)
    assert area.max() <= 1.0 and area.min() >= 0.05  # scale 0.08..1 up to rounding
    # no try fits (scale 1 with an extreme ratio) -> the centre-crop fallback
    bad = torch.zeros(1, T.n_uniforms("imagenet"), dtype=torch.float64)
    bad[:, :10] = 1 - 1e-9  # scale 1 with ratio 3/4: 15 x 21 does not fit 16 x 20
    bad[:, 40] = 0.9  # no flip
    fb, _ = T.rrc_boxes(bad, h, w)
    assert fb[0].tolist() == [0.0, 0.0, float(w), float(h)]
    x = np.random.default_rng(0).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    out = T.augment_batch(x, "imagenet", uniforms=np.tile(bad.numpy(), (3, 1)))
    assert out.shape == (3, 3, h, w)
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), x / 255.0, atol=1e-6)  # identity box is exact
    out = T.augment_batch(x, "imagenet", torch.Generator().manual_seed(1))
    assert out.shape == (3, 3, h, w) and out.min() >= 0 and out.max() <= 1


def test_decode_raw_encoded_and_errors():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    meta = {"image_shape": [6, 7, 3], "encoding": "raw"}
    np.testing.assert_array_equal(T.decode_images([v.tobytes() for v in x], meta), x)
    np.testing.assert_array_equal(T.decode_images(np.array([v.tobytes() for v in x], dtype=object), meta), x)
    enc = {"image_shape": [6, 7, 3], "encoding": "encoded"}
    np.testing.assert_array_equal(T.decode_images([_png(v) for v in x], enc), x)  # PNG is lossless
    big = rng.integers(0, 256, (12, 28, 3), dtype=np.uint8)
    assert T.decode_images([_png(big)], enc).shape == (1, 6, 7, 3)  # resized + centre-cropped
    with pytest.raises(ValueError, match=r"image\[1\].*126"):
        T.decode_images([x[0].tobytes(), b"short"], meta)
    with pytest.raises(ValueError, match="encoding"):
        T.decode_images([b""], {"image_shape": [1, 1, 1], "encoding": "jpeg2000"})
    with pytest.raises(ValueError, match=r"image\[0\]"):
        T.decode_images([b"not a png"], enc)


def test_sample_uniforms_resolve_and_normalize():
    ids = np.arange(2000)
    a = T.sample_uniforms(ids, 3, (0, 1, 2))
    assert a.shape == (2000, 3) and a.min() >= 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.02
    np.testing.assert_array_equal(a[5:9], T.sample_uniforms(ids[5:9], 3, (0, 1, 2)))  # per id, not per batch
    assert not np.allclose(a, T.sample_uniforms(ids, 3, (0, 2, 2)))
    assert T.resolve_augment("auto", {"image_shape": [32, 32, 3]}) == "cifar"
    assert T.resolve_augment("auto", {"image_shape": [224, 224, 3]}) == "imagenet"
    with pytest.raises(ValueError, match="data.augment"):
        T.resolve_augment("mixup", {"image_shape": [8, 8, 3]})
    x = torch.full((2, 3, 2, 2), 0.5)
    y = T.normalize(x.clone(), MEAN, STD)
    np.testing.assert_allclose(y[0, :, 0, 0].numpy(), [(0.5 - m) / s for m, s in zip(MEAN, STD)], rtol=1e-6)


# --------------------------------------------------------------------------- blend overlay (no Ray)


def _bucket_content(manifest, b):
    t = pq.read_table(Path(manifest["root"]) / manifest["buckets"][str(b)])
    return t.column("sample_id").to_numpy(), t


@pytest.mark.parametrize("encoding", ["raw", "encoded"])
def test_overlay_matches_reference_blend_and_is_cumulative(tmp_path, encoding):
    d, data = make_prepared(tmp_path / "ds", n_train=40, encoding=encoding)
    base = data["train"][1]
    cur = base.copy()  # in-memory reference of every sample's current image
    tail1, lost1, w1 = np.array([3, 9, 30]), np.array([12, 5, 33]), np.array([1.0, 0.85, 0.7])
    m1 = write_blend_overlay(d, tmp_path / "ov", 1, tail1, lost1, w1, chunk_size=2, bucket_size=8)
    cur[tail1] = blend_uint8(cur[tail1], cur[lost1], w1)
    # v2 blends a v1-blended sample again (tail 9) and uses one as the lost side (lost 30)
    tail2, lost2, w2 = np.array([9, 20]), np.array([30, 1]), np.array([0.9, 0.75])
    m2 = write_blend_overlay(d, tmp_path / "ov", 2, tail2, lost2, w2, prev_overlay=json.loads(json.dumps(m1)),
                             chunk_size=1)
    cur[tail2] = blend_uint8(cur[tail2], cur[lost2], w2)
    np.testing.assert_array_equal(overlay_ids(m2), [3, 9, 20, 30])
    hit, imgs = overlay_lookup(m2, np.arange(40))
    np.testing.assert_array_equal(np.flatnonzero(hit), [3, 9, 20, 30])
    np.testing.assert_array_equal(imgs, cur[[3, 9, 20, 30]])
    assert not np.array_equal(cur[9], base[9]) and not np.array_equal(cur[9], blend_uint8(base[9], base[5], 0.85))
    # v1 touched buckets 0 and 1 (ids 3, 9) and 3 (id 30); v2 rewrote only 1 and 2
    assert m1["buckets"] == {"0": "v000001/bucket-000000.parquet", "1": "v000001/bucket-000001.parquet",
                             "3": "v000001/bucket-000003.parquet"}
    assert m2["buckets"] == {"0": "v000001/bucket-000000.parquet", "1": "v000002/bucket-000001.parquet",
                             "2": "v000002/bucket-000002.parquet", "3": "v000001/bucket-000003.parquet"}
    assert load_overlay(tmp_path / "ov", 2) == m2
    assert not list((tmp_path / "ov").rglob("*spill*"))
    # pruning down to v2 keeps every file v2 reads and drops v1's superseded bucket 1
    assert prune_overlays(tmp_path / "ov", [m2]) >= 1
    assert not (tmp_path / "ov" / "v000001" / "bucket-000001.parquet").exists()
    np.testing.assert_array_equal(overlay_lookup(m2, np.array([30, 9]))[1], cur[[30, 9]])


def test_overlay_rejects_bad_plans(tmp_path):
    d, _ = make_prepared(tmp_path / "ds", n_train=16)
    with pytest.raises(ValueError, match="lengths differ"):
        write_blend_overlay(d, tmp_path / "ov", 1, [1, 2], [3], [1.0, 0.9])
    with pytest.raises(ValueError, match="both sides"):
        write_blend_overlay(d, tmp_path / "ov", 1, [1, 2], [2, 3], [1.0, 0.9])
    with pytest.raises(ValueError, match="not in the training split"):
        write_blend_overlay(d, tmp_path / "ov", 1, [1], [99], [0.8])


def test_damaged_overlay_files_are_named(tmp_path):
    """A truncated or missing blend file is reported with its path (checked on resume, and by the reader)."""
    from kcd_ray.data.blend import _BUCKETS, check_overlay

    d, _ = make_prepared(tmp_path / "ds", n_train=16)
    m = write_blend_overlay(d, tmp_path / "ov", 1, [1, 9], [2, 10], [1.0, 0.7], bucket_size=8)
    check_overlay(m)  # intact: silent
    check_overlay(None)
    bucket = tmp_path / "ov" / m["buckets"]["1"]
    bucket.write_bytes(bucket.read_bytes()[:20])  # truncated
    _BUCKETS.clear()
    with pytest.raises(ValueError, match=str(bucket)):
        check_overlay(m)
    with pytest.raises(ValueError, match=str(bucket)):
        overlay_lookup(m, np.array([9]))
    bucket.unlink()
    with pytest.raises(ValueError, match=str(bucket)):
        check_overlay(m)
    m2 = write_blend_overlay(d, tmp_path / "ov2", 1, [1], [2], [0.8])
    ids = tmp_path / "ov2" / m2["ids_file"]
    ids.write_bytes(b"junk")
    with pytest.raises(ValueError, match=str(ids)):
        check_overlay(m2)


# --------------------------------------------------------------------------- Ray Data (real local Ray)


def _epoch(ds, epoch=None, finish=None):
    from kcd_ray.ray_layer.pipeline import iter_train_batches

    ids, labels, imgs = [], [], []
    it = ds.iter_torch_batches(batch_size=16) if epoch is None else iter_train_batches(ds, 8, epoch=epoch,
                                                                                      finish=finish)
    for b in it:
        ids.append(b["sample_id"].numpy())
        labels.append(b["label"].numpy())
        imgs.append(b["image"].numpy())
        assert b["sample_id"].dtype == torch.int64 and b["label"].dtype == torch.int64
        assert b["image"].dtype == torch.float32
    ids = np.concatenate(ids)
    order = np.argsort(ids)
    return ids[order], np.concatenate(labels)[order], np.concatenate(imgs)[order]


@pytest.mark.ray
def test_train_and_eval_datasets_serve_every_row_once(ray_session, tmp_path):
    from kcd_ray.ray_layer.pipeline import eval_dataset, train_dataset

    d, data = make_prepared(tmp_path / "ds", n_train=40, n_test=12)
    ids, labels, imgs = _epoch(train_dataset(d, augment="none", seed=0))
    np.testing.assert_array_equal(ids, np.arange(40))
    np.testing.assert_array_equal(labels, data["train"][0])
    np.testing.assert_allclose(imgs, _norm(data["train"][1]), rtol=1e-5, atol=1e-5)
    ids, labels, imgs = _epoch(eval_dataset(d, split="test"))
    np.testing.assert_array_equal(ids, np.arange(12))
    np.testing.assert_allclose(imgs, _norm(data["test"][1]), rtol=1e-5, atol=1e-5)
    # encoded (PNG) files: the standard eval view of the decoded file (resize to S*256/224, centre crop S)
    d2, data2 = make_prepared(tmp_path / "png", n_train=8, n_test=10, encoding="encoded", seed=5)
    ids, _, imgs = _epoch(eval_dataset(d2, split="test", data_cpus=0.5))
    np.testing.assert_array_equal(ids, np.arange(10))
    expect = T.eval_transform([_png(v) for v in data2["test"][1]], T.read_meta(d2)).numpy()
    np.testing.assert_allclose(imgs, expect, rtol=1e-5, atol=1e-5)
    # augmented, through the local-shuffle helper: every id once per epoch, new crops each epoch (the plan reads
    # the epoch from the run's MaskStore at execution time; without a store every execution is epoch 0)
    from kcd_ray.ray_layer.mask_store import get_mask_store, set_epoch

    name = f"test_epochs_{tmp_path.name}"
    get_mask_store(name, create=True)
    ds = train_dataset(d, augment="cifar", seed=1, mask_store_name=name)
    set_epoch(name, 0)
    e1 = _epoch(ds, epoch=0)
    set_epoch(name, 1)
    e2 = _epoch(ds, epoch=1)
    np.testing.assert_array_equal(e1[0], np.arange(40))
    np.testing.assert_array_equal(e2[0], np.arange(40))
    np.testing.assert_array_equal(e1[1], data["train"][0])
    assert e1[2].shape == (40, 3, 8, 8)
    changed = [not np.array_equal(e1[2][i], e2[2][i]) for i in range(40)]
    assert sum(changed) > 30
    # same seed, same epoch -> the same crops, whatever the block layout and shuffle mode (no store: epoch 0)
    np.testing.assert_array_equal(_epoch(train_dataset(d, augment="cifar", seed=1, shuffle="block_local_files"))[2],
                                  e1[2])
    np.testing.assert_array_equal(_epoch(train_dataset(d, augment="cifar", seed=1))[2], e1[2])


@pytest.mark.ray
def test_worker_augmentation_serves_the_pipelines_images(ray_session, tmp_path, monkeypatch):
    """``augment_on="worker"``/``"split"``: uint8 rows (and their draws) cross Ray Data, and the worker's finishing
    stage gives the images the pipeline serves itself for the same (seed, epoch, id): on every back end (the sorted
    one forced by a zero cache limit) and on encoded data, whose random-resized crop stays in Ray Data."""
    from kcd_ray.data.device_augment import BatchFinisher
    from kcd_ray.ray_layer import pipeline as P
    from kcd_ray.ray_layer.mask_store import get_mask_store, set_epoch

    d, _ = make_prepared(tmp_path / "ds", n_train=40, n_test=4)
    d2, _ = make_prepared(tmp_path / "png", n_train=12, n_test=4, encoding="encoded", seed=3)
    name = f"test_worker_aug_{tmp_path.name}"
    get_mask_store(name, create=True)
    set_epoch(name, 2)
    cases = [(d, "cifar", "full", "worker"), (d, "imagenet", "block_local_files", "worker"),
             (d, "cifar", "block_local_files", "split"), (d, "imagenet", "full", "split"),
             (d, "cifar", "sorted", "split"), (d, "cifar", "sorted", "worker"), (d2, "imagenet", "full", "worker")]
    for data_dir, kind, shuffle, stage in cases:
        if shuffle == "sorted":
            monkeypatch.setattr(P, "_cache_limit", lambda: 0)
        kw = dict(augment=kind, seed=1, mask_store_name=name, shuffle="full" if shuffle == "sorted" else shuffle)
        want = _epoch(P.train_dataset(data_dir, **kw), epoch=2)
        ds = P.train_dataset(data_dir, augment_on=stage, **kw)
        raw = next(iter(ds.iter_torch_batches(batch_size=4)))
        assert raw["image"].dtype == torch.uint8 and raw["image"].shape[1:] == (8, 8, 3)
        # encoded, or cifar split: cropped in Ray Data, the worker only normalises (no draws travel)
        k = 0 if data_dir == d2 or (stage, kind) == ("split", "cifar") else T.n_uniforms(kind)
        assert ("aug" in raw) == bool(k) and (not k or raw["aug"].shape == (4, k))
        got = _epoch(ds, epoch=2, finish=BatchFinisher(T.read_meta(data_dir), kind, stage=stage))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[2], want[2], rtol=0, atol=1e-5, err_msg=f"{kind} {shuffle}")
    with pytest.raises(ValueError, match="data.augment_on"):
        P.train_dataset(d, augment_on="gpu")


@pytest.mark.ray
def test_sequential_passes_serve_each_group_in_turn(ray_session, tmp_path):
    """ED's sequential passes (``passes``): every epoch the kept rows of group 1 in a shuffled order, then group 2's,
    ...; each pass reshuffled per epoch; batches cut at pass boundaries; refused where the order cannot be served."""
    from kcd_ray.ray_layer import pipeline as P
    from kcd_ray.ray_layer.mask_store import get_mask_store, publish_mask, set_epoch

    d, data = make_prepared(tmp_path / "ds", n_train=40, n_test=4)
    labels = data["train"][0]
    k = int(labels.max()) + 1
    passes = np.array([1 + (c * 3) // k for c in range(k)])  # 3 groups of classes
    name = f"test_passes_{tmp_path.name}"
    get_mask_store(name, create=True)
    kept = np.flatnonzero(passes[labels] < 3)  # the grade's union (groups 1-2), as ED publishes it
    publish_mask(name, 1, kept, None)
    ds = P.train_dataset(d, augment="none", seed=3, mask_store_name=name, passes=passes, augment_on="worker")
    orders = []
    for epoch in (0, 1):
        set_epoch(name, epoch)
        batches = list(P.split_passes(P.iter_train_batches(ds, 8, epoch=epoch), passes))
        ids = np.concatenate([b["sample_id"].numpy() for b in batches])
        g = passes[labels[ids]]
        assert sorted(ids.tolist()) == kept.tolist()
        assert (np.diff(g) >= 0).all() and set(g.tolist()) == {1, 2}  # all of group 1, then all of group 2
        assert all(len(set(passes[b["label"].numpy()].tolist())) == 1 for b in batches)  # none straddles
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled within each pass every epoch
    with pytest.raises(ValueError, match="curriculum.mix_groups"):
        P.train_dataset(d, shuffle="block_local", passes=passes)


@pytest.mark.ray
def test_mask_and_overlay_reach_the_next_epoch_and_every_shard(ray_session, tmp_path):
    from kcd_ray.ray_layer.mask_store import get_mask_store, publish_mask
    from kcd_ray.ray_layer.pipeline import train_dataset

    d, data = make_prepared(tmp_path / "ds", n_train=48)
    name = f"test_mask_{tmp_path.name}"
    store = get_mask_store(name, create=True)
    assert ray_session.get(store.current.remote()) == (0, None, None)
    ds = train_dataset(d, augment="none", seed=0, mask_store_name=name)
    assert len(list(ds.iter_rows())) == 48  # version 0: everything kept

    kept = np.array([0, 3, 7, 8, 10, 15, 16, 17, 22, 30, 41, 47])
    tail, lost, w = np.array([3, 41]), np.array([4, 40]), np.array([1.0, 0.7])
    overlay = write_blend_overlay(d, tmp_path / "ov", 1, tail, lost, w, bucket_size=16)
    publish_mask(name, 1, kept, overlay)
    with pytest.raises(ValueError):
        publish_mask(name, 1, kept, overlay)  # versions must increase
    ids, labels, imgs = _epoch(ds)  # the same Dataset object: the plan re-executes with the new mask
    np.testing.assert_array_equal(ids, kept)
    np.testing.assert_array_equal(labels, data["train"][0][kept])
    expect = data["train"][1][kept].copy()
    expect[np.searchsorted(kept, tail)] = blend_uint8(data["train"][1][tail], data["train"][1][lost], w)
    np.testing.assert_allclose(imgs, _norm(expect), rtol=1e-5, atol=1e-5)

    publish_mask(name, 2, kept[:8])
    shards = ds.streaming_split(2, equal=True)
    got = {}

    def consume(i):
        got[i] = np.concatenate([b["sample_id"] for b in shards[i].iter_batches(batch_size=4)])

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert len(got[0]) == len(got[1]) == 4
    np.testing.assert_array_equal(np.sort(np.concatenate([got[0], got[1]])), kept[:8])


@pytest.mark.ray
@pytest.mark.parametrize("decode_in_actor", [True, False])
def test_offline_scores_equal_a_plain_torch_pass_over_the_current_images(ray_session, tmp_path, decode_in_actor):
    """The offline E-step scores every sample once, on its current (blended) image, un-augmented: the values
    equal the value function applied by hand, whether the scoring actor or separate tasks decode."""
    from kcd_ray.condense.values import VALUE_FNS, make_context
    from kcd_ray.config import load_config
    from kcd_ray.ray_layer.mask_store import get_mask_store, publish_mask
    from kcd_ray.models import build_model
    from kcd_ray.ray_layer.scoring import offline_scores

    d, data = make_prepared(tmp_path / "ds", n_train=40)
    name = f"test_offline_{tmp_path.name}"
    get_mask_store(name, create=True)
    tail, lost, w = np.array([3, 30]), np.array([4, 31]), np.array([1.0, 0.7])
    publish_mask(name, 1, np.array([0, 3, 30]), write_blend_overlay(d, tmp_path / "ov", 1, tail, lost, w))
    torch.manual_seed(0)
    student = build_model("resnet8", 5).eval()
    cfg = load_config(base={"model": "resnet8", "optim": {"threads": 1}, "kcd": {"offline_batch_size": 16}})
    ids, vals = offline_scores(str(d), cfg, student.state_dict(), epoch=0, mask_store=name,
                               decode_in_actor=decode_in_actor)
    np.testing.assert_array_equal(ids, np.arange(40))  # condensed-away samples are scored too
    imgs = data["train"][1].copy()
    imgs[tail] = blend_uint8(imgs[tail], imgs[lost], w)
    with torch.no_grad():
        expect = VALUE_FNS.get("entropy")(student(torch.from_numpy(_norm(imgs))), None,
                                          torch.as_tensor(data["train"][0]), make_context(np.arange(40), 0, 0, 1.0))
    np.testing.assert_allclose(vals, expect.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes,batch,drop_last", [([5, 3, 8, 1], 4, False), ([10], 3, True), ([2, 2, 2], 8, False),
                                                   ([7, 0, 6], 7, False)])
def test_rebatch_cuts_blocks_into_the_batches_ray_would_make(sizes, batch, drop_last):
    """iter_train_batches fetches whole blocks and cuts them here: every batch has the rows Ray's own batching
    (batch_size=batch) would give it, in order, across block boundaries."""
    from kcd_ray.ray_layer import pipeline as P

    rows = torch.arange(sum(sizes))
    blocks, start = [], 0
    for n in sizes:
        blocks.append({"sample_id": rows[start:start + n], "image": rows[start:start + n, None].repeat(1, 2)})
        start += n
    got = list(P.rebatch(iter(blocks), batch, drop_last))
    want = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    if drop_last and len(want[-1]) < batch:
        want = want[:-1]
    assert [b["sample_id"].tolist() for b in got] == [w.tolist() for w in want]
    assert all(torch.equal(b["image"][:, 1], b["sample_id"]) for b in got)
    with pytest.raises(ValueError, match="batch_size"):
        list(P.rebatch(iter(blocks), 0))
