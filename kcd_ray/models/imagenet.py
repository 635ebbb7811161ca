"""ImageNet-size models from torchvision (never pretrained here, nothing is downloaded).

Registered names:
  ``imagenet_resnet18``, ``imagenet_resnet34``, ``imagenet_resnet50``, ``imagenet_mobilenet_v2``.

They keep torchvision's module names, so a torchvision state dict loads into them unchanged,
and add the zoo's feature interface: ``forward(x, is_feat=True)`` returns
``[stem, stage1, ..., stageK, pooled], logits`` where ``stem`` is the output of the stem
(ResNet: conv-BN-ReLU-maxpool; MobileNetV2: the first conv). ResNets also give pre-activation
stage outputs with ``preact=True`` (the last block's residual sum before its ReLU); MobileNetV2
ignores ``preact``, as the CIFAR MobileNetV2 does.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.mobilenetv2 import MobileNetV2 as TVMobileNetV2

from .zoo import register


def _last_block_with_preact(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's Basic/Bottleneck forward, also returning the sum before the final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, tv_resnet.Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    pre = out + identity
    return torch.relu(pre), pre


class ImageNetResNet(tv_resnet.ResNet):
    def _stage(self, stage: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in stage[:-1]:
            x = block(x)
        return _last_block_with_preact(stage[-1], x)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.maxpool,
                              self.layer1, self.layer2, self.layer3, self.layer4])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        last = "bn3" if isinstance(self.layer1[0], tv_resnet.Bottleneck) else "bn2"
        return [getattr(stage[-1], last) for stage in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f0 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1, f1_pre = self._stage(self.layer1, f0)
        f2, f2_pre = self._stage(self.layer2, f1)
        f3, f3_pre = self._stage(self.layer3, f2)
        f4, f4_pre = self._stage(self.layer4, f3)
        f5 = torch.flatten(self.avgpool(f4), 1)
        logits = self.fc(f5)
        if not is_feat:
            return logits
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, f4_pre, f5], logits
        return [f0, f1, f2, f3, f4, f5], logits


class ImageNetMobileNetV2(TVMobileNetV2):
    # Slices of ``features`` that end where the CIFAR MobileNetV2 takes its features:
    # stem | 16+24 ch | 32 ch | 64+96 ch | 160+320 ch; ``features[18]`` is the 1x1 head conv.
    STAGES = ((0, 1), (1, 4), (4, 7), (7, 14), (14, 18))

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.features[:18]])

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        feats = []
        for start, stop in self.STAGES:
            x = self.features[start:stop](x)
            feats.append(x)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features[18](x), 1), 1)
        feats.append(pooled)
        logits = self.classifier(pooled)
        return (feats, logits) if is_feat else logits


@register("imagenet_resnet18")
def imagenet_resnet18(num_classes: int) -> nn.Module:
    return ImageNetResNet(tv_resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


@register("imagenet_resnet34")
def imagenet_resnet34(num_classes: int) -> nn.Module:
    return ImageNetResNet(tv_resnet.BasicBlock, [3, 4, 6, 3], num_classes=num_classes)


@register("imagenet_resnet50")
def imagenet_resnet50(num_classes: int) -> nn.Module:
    return ImageNetResNet(tv_resnet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


@register("imagenet_mobilenet_v2")
def imagenet_mobilenet_v2(num_classes: int) -> nn.Module:
    return ImageNetMobileNetV2(num_classes=num_classes)
