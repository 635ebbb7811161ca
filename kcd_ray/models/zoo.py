"""The model registry: ``build_model``, ``list_models`` and ``feature_shapes``.

Architecture modules register a factory ``f(num_classes) -> nn.Module`` under their public name;
``build_model`` also builds torchvision and factory models (``sources.py``, with ``taps.py``'s feature interface)
and stamps every model with ``arch`` (its name), ``num_classes`` and ``model_kwargs`` so checkpoints and
connectors can be rebuilt from the model alone.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from kcd_ray.registry import Registry

ModelFactory = Callable[[int], nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: ``@register("resnet8")`` on a ``f(num_classes) -> nn.Module``."""
    return MODELS.register(name)


def build_model(name: str, num_classes: int, kwargs: Optional[Mapping[str, Any]] = None,
                taps: Sequence[str] = ()) -> nn.Module:
    """A freshly initialised model: a zoo name, ``torchvision/<name>`` or ``package.module:callable`` (``sources.py``).

    ``kwargs``: constructor arguments of a torchvision or factory model; ``taps``: its feature nodes (``taps.py``;
    empty: the family's defaults). Unknown names raise KeyError listing the zoo; a source that fails, a
    ``ModelSourceError`` (a ValueError) naming it.
    """
    from .sources import ModelSourceError, build_source_model, source_kind

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r} (model {name!r})")
    kind = source_kind(name)
    if kind in (None, "zoo"):
        factory = MODELS.get(name)  # KeyError listing the zoo for a name of no known form
        if kwargs:
            raise ModelSourceError(f"{name}: a zoo model takes no constructor arguments (got {dict(kwargs)})")
        if taps:
            from .taps import TapError

            raise TapError(f"{name}: a zoo model has its own feature taps; taps apply to torchvision/ and factory "
                           "models")
        model = factory(num_classes)
    else:
        from .taps import attach_taps

        model = attach_taps(build_source_model(name, num_classes, kwargs), name, num_classes, kwargs, taps)
    model.arch = name
    model.num_classes = num_classes
    model.model_kwargs = dict(kwargs or {})
    return model


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's input must have: those of its first convolution (None when it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def list_models() -> list[str]:
    return MODELS.names()


def feature_shapes(name: str, num_classes: int = 100, image_size: int = 32, kwargs: Optional[Mapping] = None,
                   taps: Sequence[str] = ()) -> list[tuple]:
    """Shapes (without the batch dimension) of ``feats`` from ``model(x, is_feat=True)``.

    Computed on the meta device: no memory for weights, no arithmetic, so it is cheap even for
    ResNet50 and can be called while building connectors.
    """
    from .sources import kwargs_key

    return list(_feature_shapes(name, int(num_classes), int(image_size), kwargs_key(kwargs), tuple(taps)))


@lru_cache(maxsize=None)
def _feature_shapes(name: str, num_classes: int, image_size: int, kwargs: str, taps: tuple) -> tuple:
    import json

    from .sources import build_meta

    model = build_meta(name, num_classes, build=lambda: build_model(name, num_classes, json.loads(kwargs), taps))
    model.eval()  # batch statistics of a single meta sample are not needed (and BN rejects 1x1x1)
    x = torch.empty(1, 3, image_size, image_size, device="meta")
    with torch.no_grad():
        feats, _ = model(x, is_feat=True)
    return tuple(tuple(f.shape[1:]) for f in feats)
