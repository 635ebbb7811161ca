"""Augmentation split in two stages, so a Train worker can finish it on its own device. Pure numpy/torch, no Ray.

Ray Data still reads, masks, blends, shards and (for encoded images) decodes every row; with
``data.augment_on: worker`` it then hands the Train worker a **uint8** batch ``[B, H, W, C]`` plus the
row's augmentation draws (``aug``, float64 ``[B, k]``: :func:`kcd_ray.data.transforms.sample_uniforms`
of (seed, epoch, sample id), computed where the row is built, so the result never depends on where the
augmentation runs). The worker finishes the batch with :func:`device_stage` on whatever device holds it,
vectorised over the batch:

- raw (fixed-size) data: the whole augmentation runs on the worker: ``cifar`` crop-from-padded + flip as one
  indexed gather of uint8 pixels (pixel-exact, the same integer offsets as the numpy path), ``imagenet``
  random-resized crop as one ``torchvision.ops.roi_align`` over the batch's boxes, then the normalisation;
- encoded data (images of any size): the random-resized crop of each whole image (or the cifar recipe on the
  image brought to S x S) stays in Ray Data, one image at a time (:func:`host_stage`: no batched op
  takes images of different sizes), and the worker only normalises the uint8 S x S result.

With ``data.augment_on: split`` (CPU workers' default) the pixel-exact part on raw data (``cifar``'s crop/flip)
also runs in Ray Data's ``host_stage`` and the worker only normalises: on a CPU the consumer is the training
process itself, so it gets the least work.

``host_stage`` followed by ``device_stage`` computes what :func:`kcd_ray.data.transforms.train_transform`
computes, up to floating-point rounding of the normalisation (``tests/test_device_augment.py``; the GPU check
script compares CUDA against CPU).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from kcd_ray.data import transforms as T


STAGES = ("worker", "split")  # data.augment_on values that serve uint8 rows (see the module docstring)
AUGMENT_ON = ("pipeline", "worker", "split")  # resolved values of data.augment_on (augment_stage)
CPU_AUGMENT_ON = "split"  # data.augment_on=auto on CPU workers: see augment_stage


def augment_stage(choice: str, gpu: bool) -> str:
    """Where a run's training augmentation runs (``data.augment_on``); ``auto``: ``worker`` on GPU workers,
    ``split`` on CPU workers.

    ``worker``: uint8 rows and their draws cross Ray Data; crop, flip and normalisation run on the worker's
    device (on a GPU, vectorised over the batch after a pinned copy). ``split``: the pixel-exact part (cifar's
    crop/flip on uint8) runs in Ray Data's map tasks, the worker only normalises (random-resized crops stay on
    the worker). ``pipeline``: float rows, everything in Ray Data's tasks.

    Measured on 2 CPU cores, no model (``bench/data_ceiling.py``, BENCHMARKS.md), 50k CIFAR rows: split 43k, worker
    31k img/s (the in-process DataLoader 77k); float rows (``pipeline``) 14k at 8k rows. On a CPU the consumer is
    the training process itself, so every microsecond of finishing moved to the map tasks is one the step gets
    back; on this machine two processes doing numpy work on the two cores slow each other ~1.7x (memory-bound),
    so the split that leaves the consumer the least work wins."""
    if choice == "auto":
        return "worker" if gpu else CPU_AUGMENT_ON
    return choice


def device_kind(meta: dict, kind: str, stage: str = "worker") -> str:
    """The part of augmentation ``kind`` the worker runs on this data: all of it on raw data, only the
    normalisation (``none``) on encoded data, and with ``stage="split"`` only the normalisation wherever the rest
    is pixel-exact on uint8 (``cifar``'s crop/flip: it then runs in Ray Data's tasks)."""
    T._check_kind(kind)
    if stage not in STAGES:
        raise ValueError(f"data.augment_on: {stage!r} does not serve uint8 rows; expected one of {STAGES}")
    if meta.get("encoding") == "encoded" or (stage == "split" and kind in ("cifar", "none")):
        return "none"
    return kind


def host_stage(x, meta: dict, kind: str, uniforms, stage: str = "worker") -> np.ndarray:
    """What Ray Data does to a batch before the worker's :func:`device_stage`: decoded uint8 [B, H, W, C];
    encoded data also augmented (random-resized crop of each whole image, flip) with ``uniforms``; with
    ``stage="split"`` raw data also cropped and flipped (``cifar``: the same integer offsets, pixel-exact)."""
    if meta.get("encoding") == "encoded":
        return T.train_uint8_encoded(x, meta, kind, uniforms)
    x = T.decode_images(x, meta) if not isinstance(x, (np.ndarray, torch.Tensor)) else np.asarray(x)
    if device_kind(meta, kind, stage) == kind:
        return x
    return T.augment_uint8(x, kind, uniforms=uniforms)


def _cifar(x: torch.Tensor, u: torch.Tensor, pad: int = T.CIFAR_PAD) -> torch.Tensor:
    """uint8 [B, H, W, C] -> the crop of the zero-padded image + flip; offsets from the same float64
    arithmetic as :func:`kcd_ray.data.transforms.cifar_params`, so the pixels equal the numpy path's."""
    b, h, w, c = x.shape
    xp = x.new_zeros((b, h + 2 * pad, w + 2 * pad, c))
    xp[:, pad:pad + h, pad:pad + w] = x
    span = 2 * pad + 1
    dy = (u[:, 0] * span).long().clamp_(max=2 * pad)
    dx = (u[:, 1] * span).long().clamp_(max=2 * pad)
    flip = u[:, 2] < 0.5
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h[None, :]
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w[None, :], ar_w[None, :])
    return xp[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _nchw_float(x: torch.Tensor, meta: Optional[dict], channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W], ((x / 255) - mean) / std with ``meta``'s statistics (x / 255
    without): the constants of :func:`kcd_ray.data.transforms.to_float_nchw`. The NHWC buffer permuted is
    already channels-last in memory; ``channels_last=False`` makes it contiguous NCHW."""
    c = x.shape[-1]
    if meta is None:
        scale, bias = np.full(c, 1.0 / 255.0), np.zeros(c)
    else:
        m, sd = T._mean_std(meta["mean"], meta["std"], c)
        scale, bias = 1.0 / (255.0 * sd), -m / sd
    scale_t = torch.as_tensor(scale.astype(np.float32), device=x.device)
    bias_t = torch.as_tensor(bias.astype(np.float32), device=x.device)
    out = torch.addcmul(bias_t, x.float(), scale_t)  # [B, H, W, C]: C is the innermost dimension here
    out = out.permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


def _rrc(x: torch.Tensor, u: torch.Tensor, meta: dict, channels_last: bool) -> torch.Tensor:
    """Random-resized crop of fixed-size images on x's device: :func:`kcd_ray.data.transforms.rrc_boxes` (on the
    host: a few numbers per row) and one ``roi_align`` over the batch, as the numpy path's."""
    from torchvision.ops import roi_align

    b, h, w, _ = x.shape
    boxes, flip = T.rrc_boxes(u.detach().to("cpu", torch.float64), h, w)
    rois = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], boxes.float()], 1).to(x.device)
    xf = _nchw_float(x, None, False)
    out = roi_align(xf, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    flip = flip.to(x.device)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out).clamp_(0.0, 1.0)
    out = T.normalize(out, meta["mean"], meta["std"])
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _on_host(x: torch.Tensor, aug: Optional[torch.Tensor], meta: dict, kind: str, channels_last: bool) -> torch.Tensor:
    """A CPU batch: the numpy path of ``train_transform`` itself (measured on 1 thread, batch 64 CIFAR: 295 us
    against 990 us for the torch ops below, whose advanced indexing is slow on a CPU)."""
    u = None if aug is None else aug.numpy()
    out = T.train_transform(x, meta, kind, uniforms=u) if x.shape[0] else _nchw_float(x, meta, False)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def device_stage(x: torch.Tensor, aug: Optional[torch.Tensor], meta: dict, kind: str, *,
                 channels_last: bool = False, backend: str = "auto") -> torch.Tensor:
    """Finish a batch on ``x``'s device: uint8 [B, H, W, C] + draws ``aug`` [B, k] (``kind``'s
    :func:`kcd_ray.data.transforms.n_uniforms`; None for ``none``) -> normalised float32 [B, C, H, W].
    ``backend``: ``auto`` = numpy on a CPU tensor, torch ops on a GPU one; ``torch`` forces the torch ops (the
    tests compare them with the numpy path on a CPU)."""
    T._check_kind(kind)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"image: expected uint8 [B, H, W, C] on the worker, got {x.dtype} {tuple(x.shape)}")
    k = T.n_uniforms(kind)
    if k and (aug is None or tuple(aug.shape) != (x.shape[0], k)):
        got = None if aug is None else tuple(aug.shape)
        raise ValueError(f"aug: expected the rows' augmentation draws, shape ({x.shape[0]}, {k}) for {kind!r}; "
                         f"got {got}")
    if backend == "auto" and x.device.type == "cpu":
        return _on_host(x, aug, meta, kind, channels_last)
    if kind == "imagenet" and x.shape[0]:
        return _rrc(x, aug, meta, channels_last)
    if kind == "cifar" and x.shape[0]:
        x = _cifar(x, aug.to(x.device, torch.float64))
    return _nchw_float(x, meta, channels_last)


class BatchFinisher:
    """The Train worker's last input stage: a batch from Ray Data with uint8 ``image`` and ``aug`` ->
    the same batch with the normalised float ``image`` on the batch's device (Ray's ``iter_torch_batches``
    already moved it there, from pinned memory on a GPU, in its prefetch thread)."""

    def __init__(self, meta: dict, kind: str, *, channels_last: bool = False, stage: str = "worker"):
        self.meta, self.kind, self.channels_last = meta, device_kind(meta, kind, stage), channels_last

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        out["image"] = device_stage(out["image"], out.pop("aug", None), self.meta, self.kind,
                                    channels_last=self.channels_last)
        return out
