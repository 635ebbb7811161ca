"""Small modules that bridge student and teacher features of any two architectures.

All are built from feature shapes without the batch dimension: ``(C, H, W)`` maps or ``(D,)`` vectors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def f32(x: torch.Tensor) -> torch.Tensor:
    """Losses run in at least float32 (half/bfloat16 under AMP are upcast; float64 is kept)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pool_to_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the spatially larger of two maps to the other's size (RepDistiller's rule)."""
    if a.shape[2:] == b.shape[2:]:
        return a, b
    if a.shape[2] * a.shape[3] > b.shape[2] * b.shape[3]:
        return F.adaptive_avg_pool2d(a, b.shape[2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[2:])


def paired(s_shapes: Sequence, t_shapes: Sequence) -> int:
    """How many (student, teacher) layers a multi-layer method pairs up: the shorter list wins, like
    RepDistiller's zip over feats[1:-1] when the two nets have different depths."""
    return min(len(s_shapes), len(t_shapes))


class ConvReg(nn.Module):
    """Regress a student map (C_s, H_s, W_s) onto a teacher map's shape (C_t, H_t, W_t).

    RepDistiller's cases (stride-2 conv, stride-2 transposed conv, 'valid' conv) plus a bilinear
    upsample for any other enlargement, so every pair of zoo architectures is covered.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = tuple(s_shape), tuple(t_shape)
        self.upsample: tuple[int, int] | None = None
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.upsample = (t_h, t_w)
            self.conv = nn.Conv2d(s_c, t_c, 3, padding=1)
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            x = F.interpolate(x, size=self.upsample, mode="bilinear", align_corners=False)
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


class LinearReg(nn.Module):
    """Regress a flat student vector onto a teacher vector (a hint on the pooled layer)."""

    def __init__(self, s_dim: int, t_dim: int, use_relu: bool = True):
        super().__init__()
        self.linear = nn.Linear(s_dim, t_dim)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return F.relu(x) if self.use_relu else x


def regressor(s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> nn.Module:
    if len(s_shape) == 3 and len(t_shape) == 3:
        return ConvReg(s_shape, t_shape, use_relu)
    if len(s_shape) == 1 and len(t_shape) == 1:
        return LinearReg(s_shape[0], t_shape[0], use_relu)
    raise ValueError(f"cannot regress a feature of shape {tuple(s_shape)} onto one of shape {tuple(t_shape)}")


class ChannelAdapter(nn.Module):
    """1x1 conv + BN from C_s to C_t channels, or the identity when they already agree."""

    def __init__(self, s_channels: int, t_channels: int):
        super().__init__()
        self.proj = (
            nn.Identity() if s_channels == t_channels
            else nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Embed(nn.Module):
    """Linear projection of a (flattened) feature, optionally L2-normalised (CRD, CC, HKD)."""

    def __init__(self, dim_in: int, dim_out: int = 128, normalize: bool = True):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return F.normalize(x, dim=1) if self.normalize else x


def _conv_stack(channels: Sequence[int], bn: bool, transpose: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    for c_in, c_out in zip(channels, channels[1:]):
        layers.append(conv(c_in, c_out, 3, 1, 1))
        if bn:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Factor Transfer's auto-encoder on the teacher's last map: C -> k*C factors -> C."""

    def __init__(self, t_shape: Sequence[int], rate: float = 0.5, use_bn: bool = False):
        super().__init__()
        c = int(t_shape[0])
        k = max(1, int(c * rate))
        self.encoder = _conv_stack([c, c, k, k], use_bn)
        self.decoder = _conv_stack([k, k, c, c], use_bn, transpose=True)

    def forward(self, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(f_t)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Factor Transfer's student-side encoder: C_s -> k*C_t factors."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], rate: float = 0.5, use_bn: bool = True):
        super().__init__()
        c_s, k = int(s_shape[0]), max(1, int(int(t_shape[0]) * rate))
        self.encoder = _conv_stack([c_s, c_s, k, k], use_bn)

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        return self.encoder(f_s)
