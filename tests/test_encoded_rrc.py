"""Encoded (PNG/JPEG) data follows torchvision's ImageNet recipe on the whole decoded image (no Ray).

Train: RandomResizedCrop of the full image (its box drawn from the per-sample uniforms exactly as
``RandomResizedCrop.get_params`` draws it) -> S x S, flip, normalise. Eval: shorter side to
round(S * 256 / 224), centre crop S. Raw data and the ``cifar``/``none`` kinds are as before; blend
overlays (S x S uint8) mix with encoded rows in one batch.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision.transforms.transforms as tv_transforms
from torchvision.io import decode_image, encode_jpeg, encode_png
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from kcd_ray.data import transforms as T
from kcd_ray.data import row_maps as B
from kcd_ray.ray_layer import batch_maps
from kcd_ray.ray_layer import full_shuffle as F

S = 32
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]
RAW = {"image_shape": [S, S, 3], "encoding": "raw", "mean": MEAN, "std": STD}
ENC = dict(RAW, encoding="encoded")
SIZES = [(60, 80), (80, 60), (45, 45), (24, 100), (S, S), (20, 28)]  # (h, w): landscape, portrait, square, ...
EDGE = {"left": (255, 0, 0), "right": (0, 255, 0), "top": (0, 0, 255), "bottom": (255, 255, 0)}


def framed(h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 [3, h, w]: a dim gradient with noise, and a 3-pixel band of its own colour along each edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([40 + 60 * yy / h, 40 + 60 * xx / w, 70 + 0 * xx], -1) + rng.integers(0, 20, (h, w, 3))
    img[:3], img[-3:] = EDGE["top"], EDGE["bottom"]
    img[:, :3], img[:, -3:] = EDGE["left"], EDGE["right"]
    return torch.from_numpy(img.astype(np.uint8)).permute(2, 0, 1).contiguous()


def png(img: torch.Tensor) -> bytes:
    return encode_png(img).numpy().tobytes()


def jpeg(img: torch.Tensor) -> bytes:
    return encode_jpeg(img, quality=95).numpy().tobytes()


def decoded(data: bytes) -> torch.Tensor:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def norm(chw_uint8: list) -> torch.Tensor:
    """What the transforms end with: uint8 [C, S, S] images -> normalised float32 NCHW."""
    return T.to_float_nchw(torch.stack(chw_uint8).permute(0, 2, 3, 1).numpy(), MEAN, STD)


@pytest.fixture(scope="module")
def files():
    imgs = [framed(h, w, i) for i, (h, w) in enumerate(SIZES)]
    return imgs, [png(x) for x in imgs]


def _whole_image_uniforms(n: int) -> np.ndarray:
    """Every try draws scale 1 and ratio 4/3: the box is the whole image for a 60 x 80 (h x w) image, and no
    try fits a square one, whose centre-crop fallback is then the whole image too; no flip."""
    u = np.zeros((n, T.n_uniforms("imagenet")))
    u[:, :2 * T.RRC_TRIES] = 1.0
    u[:, 4 * T.RRC_TRIES] = 0.9
    return u


class _TorchFromUniforms:
    """Stands in for ``torch`` inside torchvision's ``RandomResizedCrop.get_params``, its random draws taken
    from one sample's uniforms in the layout ``rrc_boxes`` documents: try k draws scale u[k] and log-ratio
    u[10 + k]; the try that fits draws its top from u[20 + k] and its left from u[30 + k]."""

    def __init__(self, u):
        self.u, self.draws, self.ints, self.k = [float(v) for v in u], 0, 0, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def tensor(self, data, **_):
        return torch.tensor(data, dtype=torch.float64)

    def empty(self, *_):
        return self

    def uniform_(self, lo, hi):
        self.k, second = divmod(self.draws, 2)
        self.draws += 1
        lo, hi = float(lo), float(hi)
        return torch.tensor(lo + (hi - lo) * self.u[second * T.RRC_TRIES + self.k], dtype=torch.float64)

    def randint(self, low, high, size):
        col = 2 + self.ints
        self.ints += 1
        return torch.tensor([low + math.floor(self.u[col * T.RRC_TRIES + self.k] * (high - low))])


def torchvision_params(monkeypatch, u, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) torchvision's RandomResizedCrop picks for an h x w image with draws ``u``."""
    with monkeypatch.context() as m:
        m.setattr(tv_transforms, "torch", _TorchFromUniforms(u))
        return RandomResizedCrop.get_params(torch.zeros(1, h, w), list(T.RRC_SCALE), list(T.RRC_RATIO))


# --------------------------------------------------------------------------- train: the random-resized crop


def test_train_crop_reaches_the_edges_of_the_full_image(files):
    imgs, data = files
    sel = [0, 2]  # 60 x 80 (an exact fit of the first try) and 45 x 45 (the fallback): both the whole image
    out = T.train_transform([data[i] for i in sel], ENC, "imagenet", uniforms=_whole_image_uniforms(2))
    want = norm([TF.resize(imgs[i], [S, S], antialias=True) for i in sel])
    assert torch.equal(out, want)
    # the landscape image's side bands survive (a crop inside its centre square would have cut them off)
    px = (out[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
    assert px[0, S // 2, 0] > 200 and px[1, S // 2, 0] < 60  # red left band
    assert px[1, S // 2, -1] > 200 and px[0, S // 2, -1] < 60  # green right band
    old = T.to_float_nchw(T.decode_images([data[0]], ENC), MEAN, STD)  # the former square
    assert not torch.equal(out[:1], old)
    # small boxes pushed into opposite corners: top-left and bottom-right corners of the full image
    for pos, (row, col) in ((0.0, (0, 0)), (1 - 1e-12, (-1, -1))):
        u = np.full((1, T.n_uniforms("imagenet")), 0.5)
        u[:, :T.RRC_TRIES] = 0.0  # scale 0.08
        u[:, 2 * T.RRC_TRIES:4 * T.RRC_TRIES] = pos
        u[:, 4 * T.RRC_TRIES] = 0.9
        x1, y1, x2, y2 = T.rrc_boxes(torch.as_tensor(u), 60, 80)[0][0].tolist()
        assert (x1 == 0 and y1 == 0) if pos == 0.0 else (x2 == 80 and y2 == 60)
        out = T.train_transform([data[0]], ENC, "imagenet", uniforms=u)
        want = TF.resized_crop(imgs[0], int(y1), int(x1), int(y2 - y1), int(x2 - x1), [S, S], antialias=True)
        assert torch.equal(out, norm([want]))
        corner = (out[0, :, row, col] * torch.tensor(STD) + torch.tensor(MEAN)) * 255
        assert corner.max() > 200  # an edge band's colour, not the dim interior


def test_train_boxes_are_torchvision_random_resized_crop(monkeypatch, files):
    rng = np.random.default_rng(0)
    k = T.n_uniforms("imagenet")
    shapes = [(60, 80), (80, 60), (45, 45), (24, 100), (100, 24), (3, 5), (375, 500)]
    for h, w in shapes:
        u = rng.random((150, k))
        u[:30, :T.RRC_TRIES] = 1 - 1e-9  # scale ~1: many tries miss, some samples take the fallback
        boxes, _ = T.rrc_boxes(torch.as_tensor(u), h, w)
        for i in range(len(u)):
            top, left, bh, bw = torchvision_params(monkeypatch, u[i], h, w)
            assert boxes[i].tolist() == [left, top, left + bw, top + bh], (h, w, i)
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        # scale >= 0.08 and ratio in [3/4, 4/3] before each side was rounded to whole pixels
        assert ((bw + 0.5) * (bh + 0.5)).min() >= 0.08 * h * w
        assert ((bw - 0.5) / (bh + 0.5)).max() <= 4 / 3 + 1e-9 and ((bw + 0.5) / (bh - 0.5)).min() >= 3 / 4 - 1e-9
    # end to end: the served images are torchvision's RandomResizedCrop + flip of each decoded image
    imgs, data = files
    u = rng.random((len(data), k))
    out = T.train_transform(data, ENC, "imagenet", uniforms=u)
    want = []
    for i, img in enumerate(imgs):
        top, left, bh, bw = torchvision_params(monkeypatch, u[i], img.shape[1], img.shape[2])
        crop = TF.resized_crop(img, top, left, bh, bw, [S, S], antialias=True)
        want.append(crop.flip(-1) if u[i, 4 * T.RRC_TRIES] < 0.5 else crop)
    assert torch.equal(out, norm(want))
    assert 0 < int((u[:, 4 * T.RRC_TRIES] < 0.5).sum()) < len(data)


def test_train_is_a_pure_function_of_the_uniforms(files):
    imgs, data = files
    ids = np.arange(100, 100 + len(data))
    u = T.sample_uniforms(ids, T.n_uniforms("imagenet"), (7, 3))
    a = T.train_transform(data, ENC, "imagenet", uniforms=u)
    assert torch.equal(a, T.train_transform(data, ENC, "imagenet", uniforms=u.copy()))
    # decoded images, bytes or a sub-batch in another order: the same rows
    assert torch.equal(a, T.train_transform(T.decode_full(data, ENC), ENC, "imagenet", uniforms=u))
    perm = np.array([4, 1, 5])
    assert torch.equal(a[perm], T.train_transform([data[i] for i in perm], ENC, "imagenet", uniforms=u[perm]))
    other = T.train_transform(data, ENC, "imagenet", uniforms=T.sample_uniforms(ids, u.shape[1], (7, 4)))
    assert not torch.equal(a, other)
    g = [T.train_transform(data, ENC, "imagenet", torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*g) and g[0].shape == (len(data), 3, S, S)
    assert T.train_transform([], ENC, "imagenet").shape == (0, 3, S, S)


# --------------------------------------------------------------------------- eval


def test_eval_is_resize_256_over_224_and_centre_crop(files):
    imgs, data = files
    assert round(S * 256 / 224) == 37
    view = v2.Compose([v2.Resize(round(S * 256 / 224)), v2.CenterCrop(S)])
    jpegs = [jpeg(x) for x in imgs]
    for batch in (data, jpegs):
        want = norm([view(decoded(b)) for b in batch])
        assert torch.equal(T.eval_transform(batch, ENC), want)
        assert torch.equal(T.eval_transform(T.decode_full(batch, ENC), ENC), want)
    # torchvision's size rule: shorter side 37, the longer one truncated (80 * 37 / 60 = 49.33 -> 49)
    assert T.eval_resize_size(60, 80, S, S) == [37, 49] and T.eval_resize_size(100, 24, S, S) == [154, 37]
    assert T.eval_resize_size(224, 224, 224, 224) == [256, 256]
    assert T.eval_resize_size(375, 500, 224, 224) == [256, 341]
    # a non-square output keeps the aspect ratio and covers round(h * 8 / 7) x round(w * 8 / 7)
    assert T.eval_resize_size(100, 100, 16, 32) == [37, 37] and T.eval_resize_size(100, 400, 16, 32) == [18, 72]
    # the eval view is not the former square: the long side's bands are gone, 1/8 of the short side cropped
    assert not torch.equal(T.eval_transform(data[:1], ENC), T.to_float_nchw(T.decode_images(data[:1], ENC), MEAN, STD))


# --------------------------------------------------------------------------- unchanged: raw data, cifar/none kinds


def test_raw_data_and_the_cifar_kind_are_unchanged(files):
    imgs, data = files
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (6, S, S, 3), dtype=np.uint8)
    u = {k: rng.random((6, T.n_uniforms(k))) for k in ("cifar", "imagenet", "none")}
    # raw: the batched paths (roi_align RRC on the stored S x S image, the uint8 CIFAR gather)
    for inp in (x, [v.tobytes() for v in x], torch.from_numpy(x)):
        assert torch.equal(T.train_transform(inp, RAW, "imagenet", uniforms=u["imagenet"]),
                           T.normalize(T._random_resized_crop(x, torch.as_tensor(u["imagenet"])), MEAN, STD))
        assert torch.equal(T.train_transform(inp, RAW, "cifar", uniforms=u["cifar"]),
                           T.to_float_nchw(T._cifar(x, u["cifar"]), MEAN, STD))
        assert torch.equal(T.train_transform(inp, RAW, "none", uniforms=u["none"]), T.to_float_nchw(x, MEAN, STD))
        assert torch.equal(T.eval_transform(inp, RAW), T.to_float_nchw(x, MEAN, STD))
    centre = np.array([[0.5, 0.5, 0.9]])  # offset 4 of 8 in the padded image, no flip: the identity
    assert torch.equal(T.train_transform(x[:1], RAW, "cifar", uniforms=centre), T.to_float_nchw(x[:1], MEAN, STD))
    # encoded + cifar/none: on the S x S image decode_images makes (shorter side to S, centre crop), as before
    square = T.decode_images(data, ENC)
    for i, img in enumerate(imgs):  # decode_images itself is unchanged
        h, w = img.shape[1:]
        size = [max(S, round(h * S / min(h, w))), max(S, round(w * S / min(h, w)))]
        ref = img if (h, w) == (S, S) else TF.center_crop(TF.resize(img, size, antialias=True), [S, S])
        np.testing.assert_array_equal(square[i], ref.permute(1, 2, 0).numpy())
    for kind in ("cifar", "none"):
        uk = rng.random((len(data), T.n_uniforms(kind)))
        want = T.to_float_nchw(T.augment_uint8(square, kind, uniforms=uk), MEAN, STD)
        assert torch.equal(T.train_transform(data, ENC, kind, uniforms=uk), want)
        assert torch.equal(T.train_transform(T.decode_full(data, ENC), ENC, kind, uniforms=uk), want)


# --------------------------------------------------------------------------- pipeline: overlays + encoded rows


@pytest.fixture()
def overlays(monkeypatch):
    """Rows 1 and 4 of the batch have a blend overlay (S x S uint8, as blend.py stores them)."""
    over = np.random.default_rng(9).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    by_id = {11: over[0], 14: over[1]}

    def lookup(manifest, ids):
        hit = np.array([int(i) in by_id for i in ids])
        return hit, np.stack([by_id[int(i)] for i in np.asarray(ids)[hit]]) if hit.any() else over[:0]

    import kcd_ray.data.blend as blend

    monkeypatch.setattr(blend, "overlay_lookup", lookup)
    return by_id


def test_pipeline_mixes_overlays_with_encoded_rows(files, overlays):
    imgs, data = files
    ids = np.arange(10, 10 + len(data))
    labels = np.arange(len(data))
    column = pa.array(data, pa.binary())
    manifest = {"fake": True}
    kind, seed, epoch = "imagenet", 7, 2
    u = T.sample_uniforms(ids, T.n_uniforms(kind), (seed, epoch))
    alone = [T.train_transform(np.stack([overlays[int(i)]]) if int(i) in overlays else [data[j]], ENC, kind,
                               uniforms=u[j:j + 1])[0] for j, i in enumerate(ids)]
    eval_alone = [T.eval_transform(np.stack([overlays[int(i)]]) if int(i) in overlays else [data[j]], ENC)[0]
                  for j, i in enumerate(ids)]
    # the overlay rows are S x S images through the same recipe (eval: 37 px, centre 32 px)
    o = overlays[11]
    o = torch.from_numpy(o).permute(2, 0, 1)
    assert torch.equal(eval_alone[1], norm([TF.center_crop(TF.resize(o, [37]), [S])])[0])
    # train: block_local map path (bytes), cached path (Arrow column), sorted path (overlay column): same rows
    x1 = B.batch_images(ids, list(data), ENC, manifest)
    x2 = B.arrow_images(ids, column, ENC, manifest)
    assert isinstance(x1, list) and [a.shape[:2] for a in x1] == [(S, S) if int(i) in overlays else SIZES[j]
                                                                  for j, i in enumerate(ids)]
    for x in (x1, x2):
        out = B.augmented(ids, x, ENC, kind, seed, epoch)["image"]
        np.testing.assert_array_equal(out, torch.stack(alone).numpy())
    over_col = pa.array([overlays[int(i)].tobytes() if int(i) in overlays else None for i in ids], pa.binary())
    table = pa.table({"sample_id": ids, "label": labels, "image": column, F._OVERLAY: over_col,
                      F._EPOCH: np.full(len(ids), epoch)})
    rows = next(F._sorted_map(table, ENC, kind, seed))
    np.testing.assert_array_equal(rows["image"], torch.stack(alone).numpy())
    # every row an overlay, or none: the same per-row results
    only = np.array([11, 14])
    np.testing.assert_array_equal(B.augmented(only, B.arrow_images(only, column.take([1, 4]), ENC, manifest), ENC,
                                               kind, seed, epoch)["image"], torch.stack([alone[1], alone[4]]).numpy())
    np.testing.assert_array_equal(B.augmented(ids, B.arrow_images(ids, column, ENC, None), ENC,
                                              kind, seed, epoch)["image"][0],
                                  alone[0].numpy())
    # eval: what eval_batch serves (decode with overlays, then eval_transform)
    assert torch.equal(T.eval_transform(x1, ENC), torch.stack(eval_alone))
    batch = {"sample_id": ids, "label": labels, "image": np.array(data, dtype=object)}
    no_overlay = batch_maps.eval_batch(batch, ENC)["image"]
    np.testing.assert_array_equal(no_overlay[[0, 2, 3, 5]], torch.stack(eval_alone).numpy()[[0, 2, 3, 5]])


def test_teacher_cache_flow_matches_the_pipeline(files):
    """TeacherForward: ``uint8_images`` of the whole split, a row range of it, then train/eval_transform with
    the unit's uniforms; the pipeline serves the same images for those ids."""
    from kcd_ray.cache.store import unit_uniform_key

    _, data = files
    ids = np.arange(50, 50 + len(data))
    column = pa.chunked_array([pa.array(data[:3], pa.binary()), pa.array(data[3:], pa.binary())])
    images = B.uint8_images(column, ENC, ids)
    start, stop, seed, epoch = 1, 5, 3, 4
    x = images[start:stop]
    cached = T.train_transform(x, ENC, "imagenet",
                               uniforms=T.sample_uniforms(ids[start:stop], T.n_uniforms("imagenet"),
                                                          unit_uniform_key(f"e{epoch}", seed)))
    served = B.augmented(ids, B.arrow_images(ids, column, ENC, None), ENC, "imagenet", seed, epoch)["image"]
    np.testing.assert_array_equal(cached.numpy(), served[start:stop])
    plain = T.eval_transform(x, ENC)
    batch = {"sample_id": ids, "label": np.zeros(len(ids)), "image": np.array(data, dtype=object)}
    np.testing.assert_array_equal(plain.numpy(), batch_maps.eval_batch(batch, ENC)["image"][start:stop])


def test_decode_full_keeps_sizes_and_names_bad_files(files):
    _, data = files
    full = T.decode_full(data, ENC)
    assert [a.shape for a in full] == [(h, w, 3) for h, w in SIZES] and all(a.dtype == np.uint8 for a in full)
    raw = T.decode_full([np.zeros(S * S * 3, np.uint8).tobytes()], RAW)
    assert isinstance(raw, np.ndarray) and raw.shape == (1, S, S, 3)
    with pytest.raises(T.ImageDecodeError, match=r"sample_id 8"):
        T.decode_full([data[0], b"not an image"], ENC, sample_ids=[7, 8])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        T.decode_full([np.zeros((4, 4), np.uint8)], ENC)


def test_pipeline_overlays_with_raw_rows_are_one_uint8_batch(overlays):
    x = np.random.default_rng(4).integers(0, 256, (6, S, S, 3), dtype=np.uint8)
    ids = np.arange(10, 16)
    want = x.copy()
    want[[1, 4]] = [overlays[11], overlays[14]]
    column = pa.array([v.tobytes() for v in x], pa.binary())
    for got in (B.batch_images(ids, [v.tobytes() for v in x], RAW, {"fake": True}),
                B.arrow_images(ids, column, RAW, {"fake": True})):
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    over_col = pa.array([overlays[int(i)].tobytes() if int(i) in overlays else None for i in ids], pa.binary())
    table = pa.table({"sample_id": ids, "label": np.zeros(6, np.int64), "image": column, F._OVERLAY: over_col,
                      F._EPOCH: np.zeros(6, np.int64)})
    rows = next(F._sorted_map(table, RAW, "cifar", 1))
    u = T.sample_uniforms(ids, T.n_uniforms("cifar"), (1, 0))
    np.testing.assert_array_equal(rows["image"], T.train_transform(want, RAW, "cifar", uniforms=u).numpy())
