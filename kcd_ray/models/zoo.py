"""The model registry: ``build_model``, ``list_models`` and ``feature_shapes``.

Architecture modules register a factory ``f(num_classes) -> nn.Module`` under their public name;
``build_model`` stamps every model with ``arch`` (that name) and ``num_classes`` so checkpoints
and connectors can be rebuilt from the model alone.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from torch import nn

from kcd_ray.registry import Registry

ModelFactory = Callable[[int], nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: ``@register("resnet8")`` on a ``f(num_classes) -> nn.Module``."""
    return MODELS.register(name)


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model; unknown names raise KeyError listing the known ones."""
    factory = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r} (model {name!r})")
    model = factory(num_classes)
    model.arch = name
    model.num_classes = num_classes
    return model


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's input must have: those of its first convolution (None when it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def list_models() -> list[str]:
    return MODELS.names()


def feature_shapes(name: str, num_classes: int = 100, image_size: int = 32) -> list[tuple]:
    """Shapes (without the batch dimension) of ``feats`` from ``model(x, is_feat=True)``.

    Computed on the meta device: no memory for weights, no arithmetic, so it is cheap even for
    ResNet50 and can be called while building connectors.
    """
    return list(_feature_shapes(name, int(num_classes), int(image_size)))


@lru_cache(maxsize=None)
def _feature_shapes(name: str, num_classes: int, image_size: int) -> tuple:
    with torch.device("meta"):
        model = build_model(name, num_classes)
    model.eval()  # batch statistics of a single meta sample are not needed (and BN rejects 1x1x1)
    x = torch.empty(1, 3, image_size, image_size, device="meta")
    with torch.no_grad():
        feats, _ = model(x, is_feat=True)
    return tuple(tuple(f.shape[1:]) for f in feats)
