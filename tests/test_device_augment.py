"""The worker-side input stage: Ray Data's uint8 rows + draws, finished by ``device_stage``, equal
what ``train_transform`` serves in one piece (no Ray; the GPU check script repeats this on CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from kcd_ray.data import transforms as T
from kcd_ray.data.device_augment import BatchFinisher, device_kind, device_stage, host_stage

S = 32
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]
RAW = {"image_shape": [S, S, 3], "encoding": "raw", "mean": MEAN, "std": STD}
ENC = dict(RAW, encoding="encoded")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def draws(n: int, kind: str, seed: int = 1) -> np.ndarray:
    return T.sample_uniforms(np.arange(n) * 7 + 3, T.n_uniforms(kind), (seed, 4))


def finish(x_uint8: np.ndarray, u, meta: dict, kind: str, backend: str = "torch", stage: str = "worker",
           **kw) -> torch.Tensor:
    """The worker's stage; by default the torch ops a GPU runs (``auto`` on a CPU tensor is the numpy path)."""
    dk = device_kind(meta, kind, stage)
    aug = torch.from_numpy(u) if T.n_uniforms(dk) else None
    return device_stage(torch.from_numpy(np.ascontiguousarray(x_uint8)), aug, meta, dk, backend=backend, **kw)


@pytest.mark.parametrize("stage", ["worker", "split"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("kind", ["cifar", "imagenet", "none"])
def test_raw_two_stages_equal_train_transform(kind, backend, stage):
    x, u = images(48), draws(48, kind)
    want = T.train_transform(x, RAW, kind, uniforms=u if T.n_uniforms(kind) else None)
    host = host_stage(x, RAW, kind, u, stage)
    assert host.dtype == np.uint8 and host.shape == x.shape
    got = finish(host, u, RAW, kind, backend, stage)
    assert got.shape == want.shape == (48, 3, S, S) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_split_stage_crops_in_ray_data_and_leaves_the_worker_the_normalisation():
    """``augment_on=split``: cifar's pixel-exact crop/flip runs where the row is built, the worker only normalises
    (no draws travel); the random-resized crop, not exact in uint8, stays on the worker."""
    x, u = images(16, 4), draws(16, "cifar")
    assert device_kind(RAW, "cifar", "split") == "none" and device_kind(RAW, "cifar", "worker") == "cifar"
    assert device_kind(RAW, "imagenet", "split") == "imagenet"
    np.testing.assert_array_equal(host_stage(x, RAW, "cifar", u, "split"), T.augment_uint8(x, "cifar", uniforms=u))
    np.testing.assert_array_equal(host_stage(x, RAW, "cifar", u, "worker"), x)
    with pytest.raises(ValueError, match="augment_on: 'pipeline'"):
        device_kind(RAW, "cifar", "pipeline")


def test_cifar_crop_is_torchvisions_padded_random_crop_and_flip():
    """The reference: torchvision's ``RandomCrop(32, padding=4)`` (pad with zeros, crop at top/left drawn in
    0..8) then ``RandomHorizontalFlip``, per image, at the offsets ``cifar_params`` draws; with read-only
    (Arrow-like) and strided inputs."""
    import torchvision.transforms.v2.functional as F

    x = images(40, 6)
    u = draws(40, "cifar")
    dy, dx, flip = T.cifar_params(u)
    assert set(dy) | set(dx) <= set(range(9)) and 0 < flip.sum() < 40
    want = []
    for img, top, left, f in zip(torch.from_numpy(x).permute(0, 3, 1, 2), dy, dx, flip):
        out = F.crop(F.pad(img, [T.CIFAR_PAD]), int(top), int(left), S, S)
        want.append((F.horizontal_flip(out) if f else out).permute(1, 2, 0).numpy())
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(T.augment_uint8(ro, "cifar", uniforms=u), np.stack(want))
    strided = np.ascontiguousarray(x[:, :, ::-1])[:, :, ::-1]  # negative strides, the same pixels
    np.testing.assert_array_equal(T.augment_uint8(strided, "cifar", uniforms=u), np.stack(want))
    assert strided.strides[2] < 0
    torch.testing.assert_close(T.to_float_nchw(ro, MEAN, STD), T.to_float_nchw(strided, MEAN, STD),
                               rtol=0, atol=0)
    ref = (torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double()) \
        / torch.tensor(STD).view(1, 3, 1, 1).double()
    torch.testing.assert_close(T.to_float_nchw(ro, MEAN, STD).double(), ref, rtol=0, atol=2e-6)


def test_cifar_crop_is_pixel_exact():
    """The integer offsets of the torch gather equal the numpy path's, for draws at the bins' edges too."""
    x = images(64, 3)
    u = draws(64, "cifar")
    u[:8, :2] = np.nextafter(np.arange(1, 9)[:, None] / 9.0, 0)  # just below k/9: the largest offset of bin k-1
    from kcd_ray.data.device_augment import _cifar

    want = T.augment_uint8(x, "cifar", uniforms=u)
    got = _cifar(torch.from_numpy(x), torch.from_numpy(u)).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["imagenet", "cifar"])
def test_encoded_crop_stays_on_host_and_worker_normalises(kind):
    rng = np.random.default_rng(5)
    files = [encode_png(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))).numpy().tobytes()
             for h, w in [(60, 80), (80, 60), (S, S), (24, 100)]]
    u = draws(len(files), kind)
    assert device_kind(ENC, kind) == "none"
    host = host_stage(files, ENC, kind, u)
    assert host.dtype == np.uint8 and host.shape == (4, S, S, 3)
    torch.testing.assert_close(finish(host, u, ENC, kind), T.train_transform(files, ENC, kind, uniforms=u),
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_channels_last_is_the_same_tensor_in_another_layout(kind, backend):
    x, u = images(16, 2), draws(16, kind)
    plain = finish(x, u, RAW, kind, backend)
    cl = finish(x, u, RAW, kind, backend, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(cl, plain, rtol=0, atol=0)


def test_finisher_replaces_image_and_drops_draws():
    x, u = images(8), draws(8, "cifar")
    batch = {"image": torch.from_numpy(x), "aug": torch.from_numpy(u), "label": torch.arange(8),
             "sample_id": torch.arange(8)}
    out = BatchFinisher(RAW, "cifar")(batch)
    assert set(out) == {"image", "label", "sample_id"} and out["image"].dtype == torch.float32
    assert "aug" in batch  # the input batch is not mutated


def test_bad_inputs_name_the_field():
    x = torch.zeros(4, S, S, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"aug: expected .*\(4, 3\)"):
        device_stage(x, None, RAW, "cifar")
    with pytest.raises(ValueError, match="image: expected uint8"):
        device_stage(x.float(), torch.zeros(4, 3, dtype=torch.float64), RAW, "cifar")
    with pytest.raises(ValueError, match="augment"):
        device_kind(RAW, "mixup")
