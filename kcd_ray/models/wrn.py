"""Wide ResNets of RepDistiller's ``wrn.py``: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Pre-activation blocks (BN-ReLU-conv); depth 6n+4; a final BN-ReLU before pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import global_pool, init_fan_out_normal
from .zoo import register


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        # A projection only where the channel count changes (so wrn_16_1 has one fewer key).
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # With a projection, both branches start from the activated input; otherwise the
        # identity branch carries the raw input (the original WRN code's asymmetry).
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equalInOut else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        init_fan_out_normal(self, linear_std=None)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f4 = global_pool(self.relu(self.bn1(f3)))
        logits = self.fc(f4)
        if not is_feat:
            return logits
        if preact:
            # As in RepDistiller: the "pre-activation" of a stage is the next BN applied to it.
            # In train mode this calls those BNs a second time on the batch (updating their
            # running statistics twice), exactly like the reference code.
            f1 = self.block2.layer[0].bn1(f1)
            f2 = self.block3.layer[0].bn1(f2)
            f3 = self.bn1(f3)
        return [f0, f1, f2, f3, f4], logits


def _factory(depth: int, widen: int):
    def build(num_classes: int) -> nn.Module:
        return WideResNet(depth, widen, num_classes)

    return build


for _depth, _widen in [(16, 1), (16, 2), (40, 1), (40, 2)]:
    register(f"wrn_{_depth}_{_widen}")(_factory(_depth, _widen))
