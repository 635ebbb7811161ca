"""CIFAR ResNets of RepDistiller's ``resnet.py``: resnet8..110 and the 4x-wide resnet8x4 / resnet32x4.

Depth 6n+2 with BasicBlocks, three stages at 32/16/8 px, a projection shortcut
(``downsample``) where the shape changes. Module names match RepDistiller's state dicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import global_pool, init_kaiming, run_stage
from .zoo import register


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        preact = out + residual
        return F.relu(preact), preact


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_filters: list[int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        init_kaiming(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        f1, f1_pre = run_stage(self.layer1, f0)
        f2, f2_pre = run_stage(self.layer2, f1)
        f3, f3_pre = run_stage(self.layer3, f2)
        f4 = global_pool(f3)
        logits = self.fc(f4)
        if not is_feat:
            return logits
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, f4], logits
        return [f0, f1, f2, f3, f4], logits


_THIN = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]
_SPECS = {
    "resnet8": (8, _THIN),
    "resnet14": (14, _THIN),
    "resnet20": (20, _THIN),
    "resnet32": (32, _THIN),
    "resnet44": (44, _THIN),
    "resnet56": (56, _THIN),
    "resnet110": (110, _THIN),
    "resnet8x4": (8, _WIDE),
    "resnet32x4": (32, _WIDE),
}


def _factory(depth: int, filters: list[int]):
    def build(num_classes: int) -> nn.Module:
        return CifarResNet(depth, filters, num_classes)

    return build


for _name, (_depth, _filters) in _SPECS.items():
    register(_name)(_factory(_depth, _filters))
