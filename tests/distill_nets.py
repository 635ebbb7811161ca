"""Tiny CIFAR-style nets with the model zoo's forward signature, for fast distiller tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyNet(nn.Module):
    """conv stem -> two conv/BN blocks (the second strided) -> pooled vector -> linear.

    ``forward(x, is_feat=True)`` returns ``([stem, block1, block2, pooled], logits)`` like the zoo
    (block outputs before the ReLU when ``preact``).
    """

    def __init__(self, num_classes: int = 5, width: int = 8, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, num_classes)
        self.num_classes = num_classes

    def forward(self, x, is_feat: bool = False, preact: bool = False):
        f0 = self.stem(x)
        p1 = self.block1(f0)
        f1 = F.relu(p1)
        p2 = self.block2(f1)
        f2 = F.relu(p2)
        pooled = F.adaptive_avg_pool2d(f2, 1).flatten(1)
        logits = self.fc(pooled)
        if is_feat:
            return [f0, p1 if preact else f1, p2 if preact else f2, pooled], logits
        return logits


def make_batch(n: int = 8, num_classes: int = 5, size: int = 8, seed: int = 0, num_samples: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, size, size, generator=g),
        "label": torch.randint(0, num_classes, (n,), generator=g),
        "sample_id": torch.randperm(num_samples, generator=g)[:n],
    }
