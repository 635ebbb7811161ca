"""Batch image transforms: decode, augment, normalise. Pure numpy/torch, no Ray.

Everything works on a whole batch at once: raw images are one ``frombuffer`` + ``reshape``,
the CIFAR crop+flip is a single gather of whole pixels with per-sample index arithmetic (in
uint8), uint8 -> normalised float32 NCHW is one fused multiply-add, and the random-resized
crop resizes every crop box of the batch in one ``roi_align`` call. Only encoded files
(PNG/JPEG) are decoded one by one, which no codec avoids.

Encoded data (``meta["encoding"] == "encoded"``) follows torchvision's ImageNet recipe on each
image at its decoded size (:func:`decode_full`): train = random-resized crop of the whole image
-> S x S (+ flip), eval = shorter side to round(S * 256 / 224) + centre crop S x S, both resized
with antialiasing in uint8, one image at a time. The ``cifar``/``none`` kinds first bring each
image to S x S as :func:`decode_images` does. Raw data is stored at S x S and transformed as a
batch. KCD's blend overlays of encoded data are stored at S x S (:func:`decode_images`' size) and
go through the encoded recipe as images of that size, whatever else their batch holds.

Randomness comes either from a ``torch.Generator`` or from ``uniforms``: a float array
[B, n_uniforms(kind)] in [0, 1) that fixes every random choice per sample. The Ray pipeline
draws those from :func:`sample_uniforms` (a counter-based hash of a key and the sample id),
so a sample's augmentation does not depend on how Ray cut the data into blocks. The
plain-PyTorch baseline and the offline E-step import these same functions.

Decoding lives in :mod:`kcd_ray.data.decode` and the per-sample draws in :mod:`kcd_ray.data.draws`; both are
re-exported here, so ``transforms`` stays the one name callers use.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from kcd_ray.data.decode import (ImageDecodeError, _as_uint8_nhwc, _fit, decode_full, decode_images,  # noqa: F401
                                 image_shape, with_overlays)
from kcd_ray.data.draws import (AUGMENTS, RRC_TRIES, _check_kind, _uniforms, n_uniforms, sample_keys,  # noqa: F401
                                sample_uniforms)

CIFAR_PAD = 4
RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
RRC_RATIO = (3 / 4, 4 / 3)
EVAL_RESIZE = 256 / 224  # encoded data's eval: shorter side to round(S * 256 / 224), then centre crop S


def read_meta(data_dir) -> dict:
    """``meta.json`` of a prepared data set, checked for the fields the transforms use."""
    p = Path(data_dir).expanduser() / "meta.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: meta.json not found; expected a prepared data set folder")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    _, _, c = image_shape(meta)
    if meta.get("encoding") not in ("raw", "encoded"):
        raise ValueError(f"{p}: encoding {meta.get('encoding')!r}; expected 'raw' or 'encoded'")
    for k in ("mean", "std"):
        if not (isinstance(meta.get(k), list) and len(meta[k]) == c):
            raise ValueError(f"{p}: {k} {meta.get(k)!r}; expected {c} per-channel values (0..1 scale)")
    meta["_data_dir"] = str(Path(data_dir).expanduser())  # for decode errors that name the Parquet file
    return meta


# --------------------------------------------------------------------------- augmentation


def _torch_view(a: np.ndarray) -> torch.Tensor:
    """A tensor over ``a``'s memory for reading (torch takes no negative strides; it warns once about read-only
    arrays, such as zero-copy views of Arrow buffers, which are only read here)."""
    if any(st < 0 for st in a.strides):
        a = np.ascontiguousarray(a)
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def to_float_nchw(x, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W]: x/255, or ((x/255) - mean) / std in the same pass.

    torch's cast-and-transpose copy into the NCHW buffer, then the scale and bias in place: the same float32
    operations as a numpy multiply-add (equal bits), measured 2.5-2.7 against 3.3-3.5 us per CIFAR image on 1 core
    at B=64 (a chain that allocates per op, ``x.permute().float().sub().div()``, took 7.7).
    """
    a = _as_uint8_nhwc(x)
    b, h, w, c = a.shape
    if mean is None:
        scale, bias = np.full(c, 1.0 / 255.0, np.float32), np.zeros(c, np.float32)
    else:
        m, sd = _mean_std(mean, std, c)
        scale, bias = (1.0 / (255.0 * sd)).astype(np.float32), (-m / sd).astype(np.float32)
    out = torch.empty((b, c, h, w), dtype=torch.float32)
    out.copy_(_torch_view(a).permute(0, 3, 1, 2))  # the NHWC -> NCHW transpose and the uint8 -> float cast
    return out.mul_(torch.from_numpy(scale).view(1, c, 1, 1)).add_(torch.from_numpy(bias).view(1, c, 1, 1))


def augment_uint8(x, kind: str, generator: Optional[torch.Generator] = None, *, uniforms=None) -> np.ndarray:
    """The pixel-exact augmentations (``cifar`` crop+flip, ``none``) on uint8 [B, H, W, C], staying uint8."""
    if kind not in ("cifar", "none"):
        raise ValueError(f"augment: {kind!r} is not pixel-exact; use augment_batch")
    a = _as_uint8_nhwc(x)
    if kind == "none" or a.shape[0] == 0:
        return a
    return _cifar(a, _uniforms(a.shape[0], kind, generator, uniforms))


def augment_batch(x, kind: str, generator: Optional[torch.Generator] = None, *, uniforms=None) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [0, 1], augmented per sample.

    ``cifar``: random 32-style crop from a 4-pixel zero-padded image + horizontal flip (p=0.5).
    ``imagenet``: random-resized crop (scale 0.08..1, ratio 3/4..4/3, torchvision's 10 tries then
    a centre-crop fallback) back to H x W + flip. ``none``: conversion only.
    """
    _check_kind(kind)
    if kind == "imagenet":
        a = _as_uint8_nhwc(x)
        if a.shape[0] == 0:
            return to_float_nchw(a)
        return _random_resized_crop(a, _uniforms(a.shape[0], kind, generator, uniforms))
    return to_float_nchw(augment_uint8(x, kind, generator, uniforms=uniforms))


def cifar_params(u, pad: int = CIFAR_PAD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flip) per sample from uniforms [B, 3]: offsets into the padded image, 0..2*pad."""
    u = np.asarray(u, np.float64)
    span = 2 * pad + 1
    dy = np.minimum((u[:, 0] * span).astype(np.int64), 2 * pad)
    dx = np.minimum((u[:, 1] * span).astype(np.int64), 2 * pad)
    return dy, dx, u[:, 2] < 0.5


def _cifar(x: np.ndarray, u, pad: int = CIFAR_PAD) -> np.ndarray:
    """torchvision's ``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip`` with the offsets of
    :func:`cifar_params`: one fancy-indexed gather of each sample's window out of a sliding-window view of the
    zero-padded batch (pixels viewed as opaque C-byte items, so a window row is one contiguous copy), then the
    flipped samples' columns reversed. Measured on 1 core (CIFAR, B=64 / 4,096): 6.5 / 3.6-4.7 us per image
    against 9-10 / 10-23 for a gather by per-pixel flat index (its int64 index is 8x the batch's bytes)."""
    from numpy.lib.stride_tricks import sliding_window_view

    b, h, w, c = x.shape
    xp = np.zeros((b, h + 2 * pad, w + 2 * pad, c), np.uint8)
    xp[:, pad:pad + h, pad:pad + w] = x
    dy, dx, flip = cifar_params(u, pad)
    pixels = xp.view(np.dtype((np.void, c)))[..., 0]  # [B, Hp, Wp] of C-byte pixels
    out = sliding_window_view(pixels, (h, w), axis=(1, 2))[np.arange(b), dy, dx]  # [B, H, W], a copy
    if flip.any():
        out[flip] = out[flip][:, :, ::-1]
    return out.view(np.uint8).reshape(b, h, w, c)


def rrc_boxes(u: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-resized-crop boxes (x1, y1, x2, y2) [B, 4] in pixels + flip [B], from uniforms [B, 41]."""
    b = u.shape[0]
    t = RRC_TRIES
    area = h * w * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * u[:, :t])
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    ratio = torch.exp(lo + (hi - lo) * u[:, t:2 * t])
    cw = torch.round(torch.sqrt(area * ratio))
    ch = torch.round(torch.sqrt(area / ratio))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    # fallback (no try fits): the largest centre crop with the ratio clamped to the allowed range
    in_ratio = w / h
    if in_ratio < RRC_RATIO[0]:
        fw, fh = w, int(round(w / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        fw, fh = int(round(h * RRC_RATIO[1])), h
    else:
        fw, fh = w, h
    idx = first.clamp(min=0)[:, None]
    bw = torch.where(first >= 0, cw.gather(1, idx)[:, 0], torch.full((b,), float(fw), dtype=cw.dtype))
    bh = torch.where(first >= 0, ch.gather(1, idx)[:, 0], torch.full((b,), float(fh), dtype=ch.dtype))
    # offsets: try k uses uniforms 2t+k (y) and 3t+k (x); the fallback centres the box
    oy = torch.floor(u[:, 2 * t:3 * t].gather(1, idx)[:, 0] * (h - bh + 1))
    ox = torch.floor(u[:, 3 * t:4 * t].gather(1, idx)[:, 0] * (w - bw + 1))
    oy = torch.where(first >= 0, oy, torch.div(h - bh, 2, rounding_mode="floor"))
    ox = torch.where(first >= 0, ox, torch.div(w - bw, 2, rounding_mode="floor"))
    boxes = torch.stack([ox, oy, ox + bw, oy + bh], 1)
    return boxes, u[:, 4 * t] < 0.5


def _random_resized_crop(x: np.ndarray, u: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import roi_align

    b, h, w, _ = x.shape
    boxes, flip = rrc_boxes(u, h, w)
    xf = to_float_nchw(x)
    rois = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], boxes.float()], 1)
    # One batched bilinear crop+resize. Crops are never larger than the output (it is the stored
    # size), so no antialiasing is needed; sampling_ratio=0 samples each output pixel's bin
    # centre (an identity box reproduces the image exactly).
    out = roi_align(xf, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    out[flip] = out[flip].flip(-1)
    return out.clamp_(0.0, 1.0).contiguous()


# --------------------------------------------------------------------------- encoded data, per image


def _chw(a: np.ndarray) -> torch.Tensor:
    """uint8 [h, w, C] -> contiguous [C, h, w] (no copy for decode_full's images, views of one)."""
    t = np.ascontiguousarray(np.asarray(a).transpose(2, 0, 1))
    return torch.from_numpy(t if t.flags.writeable else t.copy())


def _per_image(images, h: int, w: int, c: int, fn) -> np.ndarray:
    """uint8 [B, h, w, C] of ``fn(i, [C, h_i, w_i] tensor) -> [C, h, w]`` over the images."""
    out = np.empty((len(images), h, w, c), np.uint8)
    for i, a in enumerate(images):
        out[i] = fn(i, _chw(a)).permute(1, 2, 0).numpy()
    return out


def _rrc_full(images, u: torch.Tensor, h: int, w: int, c: int) -> np.ndarray:
    """Random-resized crop of each whole image (:func:`rrc_boxes` on its own size) -> h x w, then the
    flip: torchvision's RandomResizedCrop (bilinear, antialias, uint8) + RandomHorizontalFlip."""
    from torchvision.transforms.v2 import functional as TF

    def crop(i, img):
        x1, y1, x2, y2 = (int(v) for v in rrc_boxes(u[i:i + 1], img.shape[1], img.shape[2])[0][0])
        return TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [h, w], antialias=True)

    out = _per_image(images, h, w, c, crop)
    flip = (u[:, 4 * RRC_TRIES] < 0.5).numpy()
    out[flip] = out[flip, :, ::-1]
    return out


def eval_resize_size(ih: int, iw: int, h: int, w: int) -> list[int]:
    """[h', w'] the eval resize brings an ih x iw image to before its centre crop to h x w: for square
    outputs torchvision's ``Resize(round(S * 256 / 224))`` (shorter side; the longer one truncated as
    there); otherwise the smallest aspect-kept size covering round(h * 256 / 224) x round(w * 256 / 224)."""
    th, tw = round(h * EVAL_RESIZE), round(w * EVAL_RESIZE)
    if th / ih >= tw / iw:
        return [th, max(tw, int(th * iw / ih))]
    return [max(th, int(tw * ih / iw)), tw]


def _eval_full(images, h: int, w: int, c: int) -> np.ndarray:
    from torchvision.transforms.v2 import functional as TF

    def view(_, img):
        size = eval_resize_size(img.shape[1], img.shape[2], h, w)
        return TF.center_crop(TF.resize(img, size, antialias=True), [h, w])

    return _per_image(images, h, w, c, view)


def train_uint8_encoded(x, meta: dict, kind: str, uniforms=None, generator=None) -> np.ndarray:
    """Encoded data's training augmentation up to the normalisation: uint8 [B, S, S, C]."""
    h, w, c = image_shape(meta)
    images = decode_full(x, meta)
    if kind == "imagenet":
        return _rrc_full(images, _uniforms(len(images), kind, generator, uniforms), h, w, c)
    # cifar/none: as for raw data, on the images brought to h x w as decode_images does
    return augment_uint8(_per_image(images, h, w, c, lambda _, img: _fit(img, h, w)), kind, generator,
                         uniforms=uniforms)


def _train_encoded(x, meta: dict, kind: str, generator, uniforms) -> torch.Tensor:
    return to_float_nchw(train_uint8_encoded(x, meta, kind, uniforms, generator), meta["mean"], meta["std"])


# --------------------------------------------------------------------------- normalisation


def _mean_std(mean, std, c: int) -> tuple[np.ndarray, np.ndarray]:
    m, sd = np.asarray(mean, np.float64).reshape(-1), np.asarray(std, np.float64).reshape(-1)
    if m.size != c or sd.size != c:
        raise ValueError(f"meta.mean/meta.std: expected {c} values each, got {m.size} and {sd.size}")
    if (sd <= 0).any():
        raise ValueError(f"meta.std: expected positive values, got {sd.tolist()}")
    return m, sd


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel, for float [B, C, H, W] in [0, 1] (in place on x)."""
    m, sd = _mean_std(mean, std, x.shape[1])
    c = x.shape[1]
    return x.sub_(torch.as_tensor(m, dtype=x.dtype, device=x.device).view(1, c, 1, 1)).div_(
        torch.as_tensor(sd, dtype=x.dtype, device=x.device).view(1, c, 1, 1))


def eval_transform(x, meta: dict) -> torch.Tensor:
    """uint8 [B, H, W, C] (or the image column's bytes) -> normalised float32 [B, C, H, W].

    Encoded data: ``x`` as :func:`decode_full` takes it (images at their decoded size, or the bytes),
    each image's shorter side resized to round(S * 256 / 224) and centre-cropped to S x S.
    """
    if meta.get("encoding") == "encoded":
        h, w, c = image_shape(meta)
        return to_float_nchw(_eval_full(decode_full(x, meta), h, w, c), meta["mean"], meta["std"])
    x = decode_images(x, meta) if not isinstance(x, torch.Tensor) else x
    return to_float_nchw(x, meta["mean"], meta["std"])


def train_transform(x, meta: dict, kind: str, generator: Optional[torch.Generator] = None, *,
                    uniforms=None) -> torch.Tensor:
    """Decode (if bytes), augment and normalise one batch: what the Ray pipeline serves.

    Encoded data: ``x`` as :func:`decode_full` takes it; ``imagenet`` crops each whole image (see
    the module docstring), ``cifar``/``none`` act on it brought to S x S as :func:`decode_images` does.
    """
    _check_kind(kind)
    if meta.get("encoding") == "encoded":
        return _train_encoded(x, meta, kind, generator, uniforms)
    x = decode_images(x, meta) if not isinstance(x, torch.Tensor) else x
    if kind == "imagenet":
        return normalize(augment_batch(x, kind, generator, uniforms=uniforms), meta["mean"], meta["std"])
    return to_float_nchw(augment_uint8(x, kind, generator, uniforms=uniforms), meta["mean"], meta["std"])


def resolve_augment(cfg_augment: str, meta: dict) -> str:
    """``auto`` -> ``cifar`` for images up to 64 px a side, ``imagenet`` above; else as given."""
    if cfg_augment == "auto":
        h, w, _ = image_shape(meta)
        return "cifar" if max(h, w) <= 64 else "imagenet"
    if cfg_augment not in AUGMENTS:
        raise ValueError(f"data.augment: {cfg_augment!r} is not one of: auto, {', '.join(AUGMENTS)}")
    return cfg_augment
