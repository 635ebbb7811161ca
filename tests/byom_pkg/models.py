"""Factories called as ``factory(num_classes=..., **model_kwargs)``: what a user's package gives kcd_ray."""

from __future__ import annotations

from torch import nn
from torchvision.models import VisionTransformer


def tiny_vit(num_classes: int, image_size: int = 16, patch_size: int = 4, num_layers: int = 4, hidden_dim: int = 16):
    """A ViT of torchvision's class, tiny enough for a CPU test."""
    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=2,
                             hidden_dim=hidden_dim, mlp_dim=2 * hidden_dim, num_classes=num_classes)


class SmallCNN(nn.Module):
    """A plain CNN of a user: three stages, global pooling, a linear head (no ReLU-free pre-activation taps known)."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 3, stride=2, padding=1, bias=False),
                          nn.BatchNorm2d(width * 2 ** (i + 1)), nn.ReLU())
            for i in range(3)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width * 8, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


def small_cnn(num_classes: int, width: int = 8) -> nn.Module:
    return SmallCNN(num_classes, width)


def not_a_module(num_classes: int):
    return {"num_classes": num_classes}
