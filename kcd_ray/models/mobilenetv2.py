"""RepDistiller's CIFAR ``MobileNetV2`` (``mobile_half``: expansion T=6, width 0.5).

A stride-2 stem, seven inverted-residual groups, a 1x1 conv to 1280 channels, global average
pool and a Linear classifier (``classifier.0``). Registered as ``MobileNetV2``, the name the
student tables use. It has no pre-activation features: ``preact`` is ignored, as in RepDistiller.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import global_pool, init_fan_out_normal
from .zoo import register


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # point-wise expansion
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depth-wise
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # linear bottleneck
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels at width 1), n (repeats), s (first stride)
    SETTING = [[1, 16, 1, 1], [None, 24, 2, 1], [None, 32, 3, 2], [None, 64, 4, 2],
               [None, 96, 3, 1], [None, 160, 3, 2], [None, 320, 1, 1]]

    def __init__(self, expansion: int, width_mult: float, num_classes: int):
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList([])
        for t, c, n, s in self.SETTING:
            t = expansion if t is None else t
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_fan_out_normal(self)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.blocks])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        # RepDistiller: AvgPool2d(2, ceil_mode=True) on the 1x1 map of a 32 px input == global mean.
        f5 = global_pool(self.conv2(f4))
        logits = self.classifier(f5)
        if is_feat:
            return [f0, f1, f2, f3, f4, f5], logits
        return logits


@register("MobileNetV2")
def mobile_half(num_classes: int) -> nn.Module:
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
