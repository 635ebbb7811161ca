"""Small pieces shared by the CIFAR architectures."""

from __future__ import annotations

import math

import torch
from torch import nn


def run_stage(stage: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a stage of blocks that each return ``(out, preact)``; keep the last block's pair.

    RepDistiller's blocks return the pre-ReLU sum only from the last block of a stage
    (``is_last``); returning it from every block and keeping the last one is the same function.
    """
    preact = x
    for block in stage:
        x, preact = block(x)
    return x, preact


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, g, C/g, H, W] -> [N, C/g, g, H, W] -> [N, C, H, W]."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pool to a flat vector.

    RepDistiller uses fixed ``AvgPool2d(8)`` / ``avg_pool2d(x, 4)`` windows, which equal a global
    average exactly at 32x32 input; the adaptive form also accepts 16x16 or 64x64 input.
    """
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def init_fan_out_normal(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """The WRN / VGG / MobileNetV2 initialisation of RepDistiller (Wei Yang's CIFAR code).

    ``linear_std=None`` keeps torch's default Linear weights (WRN only zeroes the bias).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def init_kaiming(model: nn.Module) -> None:
    """The ResNet initialisation (kaiming fan-out for convs, unit BN); Linear keeps torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
