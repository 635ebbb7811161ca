"""The CIFAR ``ResNet50`` of RepDistiller's ``resnetv2.py`` (kuangliu-style: 3x3 stem, no max-pool).

Four Bottleneck stages at 32/16/8/4 px with a ``shortcut`` projection; classifier named ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import global_pool, init_kaiming, run_stage
from .zoo import register


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()  # identity; kept as a module so the key layout matches
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        preact = out + self.shortcut(x)
        return F.relu(preact), preact


class ResNetV2(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        init_kaiming(self)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.layer1[-1].bn3, self.layer2[-1].bn3, self.layer3[-1].bn3, self.layer4[-1].bn3]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = run_stage(self.layer1, f0)
        f2, f2_pre = run_stage(self.layer2, f1)
        f3, f3_pre = run_stage(self.layer3, f2)
        f4, f4_pre = run_stage(self.layer4, f3)
        f5 = global_pool(f4)
        logits = self.linear(f5)
        if not is_feat:
            return logits
        if preact:
            # RepDistiller wraps this list in another list (a bug); the flat list is what AB expects.
            return [f0, f1_pre, f2_pre, f3_pre, f4_pre, f5], logits
        return [f0, f1, f2, f3, f4, f5], logits


@register("ResNet50")
def resnet50_cifar(num_classes: int) -> nn.Module:
    return ResNetV2([3, 4, 6, 3], num_classes)
