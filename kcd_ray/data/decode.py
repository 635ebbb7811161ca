"""Decoding a batch's stored images to uint8 NHWC: raw pixels in one ``frombuffer`` + ``reshape``, encoded files
(PNG/JPEG) one by one with torchvision, brought to the data set's size (``decode_images``) or kept at their own
(``decode_full``, for the encoded data's ImageNet recipe); errors name the sample, the split's file and the image.
Part of :mod:`kcd_ray.data.transforms`, which re-exports it."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch


def image_shape(meta: dict) -> tuple[int, int, int]:
    shape = meta.get("image_shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(int(s) > 0 for s in shape)):
        raise ValueError(f"meta.image_shape: expected [H, W, C] positive integers, got {shape!r}")
    h, w, c = (int(s) for s in shape)
    return h, w, c


def _as_uint8_nhwc(x) -> np.ndarray:
    a = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype != np.uint8 or a.ndim != 4:
        raise ValueError(f"images: expected uint8 [B, H, W, C], got {a.dtype} {tuple(a.shape)}")
    return a


class ImageDecodeError(ValueError):
    """An image of a batch does not decode. ``index``: its position in the batch; ``sample_id``: its id
    when the caller passed ``sample_ids``. The message names both, and the Parquet file and the
    original source file when the caller passed ``split`` and ``data_dir``."""

    def __init__(self, msg: str, index: int, sample_id: Optional[int] = None, reason: str = ""):
        super().__init__(msg)
        self.index, self.sample_id, self.reason = index, sample_id, reason or msg


def _where(index: int, sample_ids, split: Optional[str], data_dir) -> tuple[str, Optional[int]]:
    """``image[i]`` plus, when known, ``(sample_id N of split 'train', <part file>, source <file>)``."""
    if sample_ids is None:
        return f"image[{index}]", None
    sid = int(np.asarray(sample_ids).reshape(-1)[index])
    parts = [f"sample_id {sid}" + (f" of split {split!r}" if split else "")]
    if data_dir is not None and split:
        try:  # error path only: a footer scan and one row group of the source_path column
            from kcd_ray.data.parquet_io import locate_sample

            loc = locate_sample(data_dir, split, sid)
        except Exception:  # noqa: BLE001 - the decode error must not be masked by a lookup error
            loc = {}
        if loc:
            parts.append(f"row {loc['row']} of {loc['file']}")
            if loc.get("source_path"):
                parts.append(f"source file {loc['source_path']}")
    return f"image[{index}] ({', '.join(parts)})", sid


def decode_images(images: Union[Sequence[bytes], np.ndarray], meta: dict, *, sample_ids=None,
                  split: Optional[str] = None, data_dir=None) -> np.ndarray:
    """Image column of a batch -> uint8 [B, H, W, C] at ``meta['image_shape']``.

    ``raw``: each value holds exactly H*W*C bytes (HWC order). ``encoded``: PNG/JPEG file bytes,
    decoded with torchvision and brought to H x W by a shorter-side resize and a centre crop
    (aspect ratio kept): the fixed-size images blends are made of. The transforms take encoded
    data at its decoded size instead (:func:`decode_full`). A uint8 array already shaped
    [B, H, W, C] passes through.

    ``sample_ids`` (the batch's ids), ``split`` and ``data_dir`` only serve error messages: an image
    that does not decode raises :class:`ImageDecodeError` naming its sample id, split, Parquet
    file and (image folders) original source file.
    """
    h, w, c = image_shape(meta)
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.shape[1:] != (h, w, c):
            raise ValueError(f"images: expected uint8 [B, {h}, {w}, {c}], got shape {images.shape}")
        return images
    n = len(images)
    enc = meta.get("encoding")
    if enc == "raw":
        if n == 0:
            return np.zeros((0, h, w, c), np.uint8)
        buf = b"".join(bytes(v) if not isinstance(v, bytes) else v for v in images)
        if len(buf) != n * h * w * c:
            bad = next(i for i, v in enumerate(images) if len(v) != h * w * c)
            where, sid = _where(bad, sample_ids, split, data_dir)
            raise ImageDecodeError(f"{where}: raw image has {len(images[bad])} bytes; expected H*W*C = "
                                   f"{h}*{w}*{c} = {h * w * c} (meta.image_shape)", bad, sid)
        return np.frombuffer(buf, np.uint8).reshape(n, h, w, c)
    if enc == "encoded":
        out = np.empty((n, h, w, c), np.uint8)
        for i, img in _decode_each(images, meta, True, sample_ids, split, data_dir):
            out[i] = img
        return out
    raise ValueError(f"meta.encoding: expected 'raw' or 'encoded', got {enc!r}")


def decode_full(images, meta: dict, *, sample_ids=None, split: Optional[str] = None,
                data_dir=None) -> Union[np.ndarray, list]:
    """The images of a batch as :func:`train_transform` / :func:`eval_transform` take them.

    ``encoded``: a list of uint8 [h_i, w_i, C] arrays, each file decoded at its own size (no
    resize); values that are uint8 arrays already (blend overlays) are kept, and a uint8 array or
    tensor [B, h, w, C] passes through. ``raw``: :func:`decode_images`. Errors as there.
    """
    if meta.get("encoding") != "encoded":
        return decode_images(images, meta, sample_ids=sample_ids, split=split, data_dir=data_dir)
    if isinstance(images, torch.Tensor) or (isinstance(images, np.ndarray) and images.dtype == np.uint8):
        return _as_uint8_nhwc(images)
    return [img for _, img in _decode_each(images, meta, False, sample_ids, split, data_dir)]


def with_overlays(hit, over: np.ndarray, rest) -> Union[np.ndarray, list]:
    """A batch's images: ``over`` (uint8 [k, H, W, C] blend overlays, in row order) where ``hit``, ``rest``
    (the other rows' :func:`decode_full` images, in row order) elsewhere. A uint8 [B, H, W, C] array
    when ``rest`` is one or empty, else a list (encoded images keep their own size, overlays H x W)."""
    hit = np.asarray(hit, bool)
    if isinstance(rest, np.ndarray) or not len(rest):
        out = np.empty((hit.size,) + over.shape[1:], np.uint8)
        out[hit] = over
        if len(rest):
            out[~hit] = rest
        return out
    overs, others = iter(over), iter(rest)
    return [next(overs) if h else next(others) for h in hit]


def _decode_each(images, meta: dict, fit: bool, sample_ids, split, data_dir):
    """(index, uint8 HWC) per encoded value: brought to H x W (``fit``) or at its own size."""
    h, w, c = image_shape(meta)
    for i, v in enumerate(images):
        if not fit and isinstance(v, np.ndarray) and v.dtype == np.uint8:  # an overlay image
            if v.ndim != 3 or v.shape[2] != c:
                raise ValueError(f"images[{i}]: expected uint8 [h, w, {c}], got {tuple(v.shape)}")
            yield i, v
            continue
        try:
            yield i, _decode_file(v, h, w, c, i, fit)
        except ImageDecodeError as e:
            if sample_ids is None:
                raise
            where, sid = _where(i, sample_ids, split, data_dir)
            raise ImageDecodeError(f"{where}: {e.reason}", i, sid, e.reason) from None


def _decode_file(data: bytes, h: int, w: int, c: int, index: int, fit: bool = True) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_image

    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(c)
    if mode is None:
        raise ValueError(f"meta.image_shape: encoded images need C = 1 or 3 channels, got {c}")
    try:  # (an empty value fails in frombuffer with a ValueError)
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as e:
        reason = f"not a decodable PNG/JPEG file ({' '.join(str(e).split())})"
        raise ImageDecodeError(f"image[{index}]: {reason}", index, reason=reason) from None
    return (_fit(img, h, w) if fit else img).permute(1, 2, 0).numpy()


def _fit(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 [C, h', w'] -> [C, h, w]: shorter-side resize (aspect ratio kept) + centre crop."""
    from torchvision.transforms.v2 import functional as TF

    if img.shape[1:] != (h, w):
        scale = max(h / img.shape[1], w / img.shape[2])
        size = [max(h, round(img.shape[1] * scale)), max(w, round(img.shape[2] * scale))]
        img = TF.center_crop(TF.resize(img, size, antialias=True), [h, w])
    return img
