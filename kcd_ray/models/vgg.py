"""CIFAR VGGs of RepDistiller's ``vgg.py`` (the batch-norm variants, which RepDistiller registers
as vgg8/11/13/16/19): five conv blocks, no FC stack, one Linear classifier on 512 features.

Each ``blockK`` is conv-BN-ReLU ... conv-BN (its last ReLU applied in ``forward`` so the
pre-activation is available). Max-pools follow blocks 0-2; the pool after block 3 is used only
for inputs of 64 px or more (RepDistiller: exactly 64), so 32 px inputs end at 4x4 before the
global average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import global_pool, init_fan_out_normal
from .zoo import register

_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])  # drop the last ReLU: forward applies it


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int):
        super().__init__()
        self.block0 = _make_block(cfg[0], 3)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        init_fan_out_normal(self)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList(
            [self.block0, self.pool0, self.block1, self.pool1, self.block2, self.pool2,
             self.block3, self.pool3, self.block4, self.pool4]
        )

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1_pre = self.block1(self.pool0(f0))
        f1 = F.relu(f1_pre)
        f2_pre = self.block2(self.pool1(f1))
        f2 = F.relu(f2_pre)
        f3_pre = self.block3(self.pool2(f2))
        f3 = F.relu(f3_pre)
        x = self.pool3(f3) if h >= 64 else f3
        f4_pre = self.block4(x)
        f4 = F.relu(f4_pre)
        f5 = global_pool(f4)
        logits = self.classifier(f5)
        if not is_feat:
            return logits
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, f4_pre, f5], logits
        return [f0, f1, f2, f3, f4, f5], logits


def _factory(cfg: list[list[int]]):
    def build(num_classes: int) -> nn.Module:
        return VGG(cfg, num_classes)

    return build


for _name, _cfg in _CFG.items():
    register(_name)(_factory(_cfg))
