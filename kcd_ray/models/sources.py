"""Where a model comes from: the zoo, torchvision's classification models, or a user's factory.

A model name is one of:

  ``resnet8x4``, ``imagenet_resnet18``, ...  the zoo (``zoo.py``: RepDistiller's CIFAR nets, four ImageNet ones)
  ``torchvision/<name>``                      ``torchvision.models.get_model(name, num_classes=..., **kwargs)``; the
                                              names are ``torchvision.models.list_models(module=torchvision.models)``
  ``package.module:callable``                 a user factory, called as ``callable(num_classes=..., **kwargs)``; it
                                              returns an ``nn.Module`` and must be importable on every node

``kwargs`` (``model_kwargs`` / ``distill.teacher_kwargs``) are the constructor's own arguments, e.g. ``image_size``
for a ViT. Weights are never downloaded here (``weights`` is refused): load them from a file (``distill.teacher``).
Models from torchvision and factories get the zoo's feature interface from ``taps.py``.
"""

from __future__ import annotations

import importlib
import json
import re
from functools import lru_cache
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .zoo import MODELS

TORCHVISION = "torchvision/"
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FACTORY = re.compile(rf"^({_DOTTED}):({_DOTTED})$")
HINT = ("torchvision/<name> (a torchvision classification model: `kcd-ray models` says how to list them) or "
        "package.module:callable (a factory called as callable(num_classes=..., **kwargs))")


class ModelSourceError(ValueError):
    """A model name, its constructor arguments or its factory that cannot give a model; one line, naming it."""


def source_kind(name: str) -> Optional[str]:
    """"zoo", "torchvision" or "factory" by the name's form (None: none of them); nothing is imported."""
    if name in MODELS:
        return "zoo"
    if name.startswith(TORCHVISION):
        return "torchvision"
    if _FACTORY.match(name):
        return "factory"
    return None


@lru_cache(maxsize=None)
def torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def is_model_name(name: str) -> bool:
    """What config validation accepts: a zoo name, a torchvision classification model, or a factory's form (the
    factory itself is imported by the preflight, before Ray starts: ``kcd_ray.engine.build.check_models``)."""
    kind = source_kind(name)
    if kind == "torchvision":
        return name[len(TORCHVISION):] in torchvision_names()
    return kind is not None


def kwargs_key(kwargs: Optional[Mapping[str, Any]]) -> str:
    """Canonical text of constructor arguments: part of a model's identity (rebuilds, caches)."""
    return json.dumps(dict(kwargs or {}), sort_keys=True, default=str)


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable named ``package.module:attr`` (attr may be dotted); one-line ModelSourceError if it is not there."""
    m = _FACTORY.match(spec)
    if m is None:
        raise ModelSourceError(f"{spec!r} is not of the form package.module:callable")
    module_name, attr = m.groups()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the factory's own import errors too, not only a missing module
        raise ModelSourceError(f"{spec}: cannot import {module_name} ({type(e).__name__}: {_first_line(e)}); the "
                               f"module must be importable on every node (installed, or on PYTHONPATH)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSourceError(f"{spec}: module {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSourceError(f"{spec}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    if "num_classes" in kwargs:
        raise ModelSourceError(f"{name}: num_classes is not a constructor argument to set; it comes from the data set")
    if "weights" in kwargs and kwargs["weights"] is not None:
        raise ModelSourceError(f"{name}: weights={kwargs['weights']!r}: kcd_ray never downloads weights; save "
                               "them to a file (a torchvision state dict) and pass it as distill.teacher")


def build_source_model(name: str, num_classes: int, kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """A freshly initialised torchvision or factory model (the plain module, without taps)."""
    kwargs = dict(kwargs or {})
    _check_kwargs(name, kwargs)
    kind = source_kind(name)
    if kind == "torchvision":
        from torchvision.models import get_model

        arch = name[len(TORCHVISION):]
        if arch not in torchvision_names():
            raise ModelSourceError(f"{name}: no such torchvision classification model; `kcd-ray models` says how to "
                                   "list them (torchvision.models.list_models(module=torchvision.models))")
        build, what = (lambda: get_model(arch, weights=None, num_classes=num_classes, **kwargs)), "torchvision"
    elif kind == "factory":
        factory = load_factory(name)
        build, what = (lambda: factory(num_classes=num_classes, **kwargs)), "factory"
    else:
        raise ModelSourceError(f"{name!r} is not a zoo model ({', '.join(MODELS.names())}); or {HINT}")
    try:
        model = build()
    except ModelSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad constructor argument surfaces as almost any error type
        raise ModelSourceError(f"{name}: the {what} constructor failed with num_classes={num_classes}, kwargs "
                               f"{kwargs_key(kwargs)} ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{name}: returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def build_meta(name: str, num_classes: int, kwargs: Optional[Mapping[str, Any]] = None,
               build: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """The model on the meta device: no memory, no arithmetic. Constructors that compute with tensors (RegNet's
    widths) cannot run under ``torch.device("meta")``; those are built on the CPU, then moved, without touching
    the global random stream."""
    if build is None:
        from .zoo import build_model

        build = lambda: build_model(name, num_classes, kwargs=kwargs)  # noqa: E731
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # noqa: BLE001 - retried on the CPU: a real failure raises again there
        with torch.random.fork_rng(devices=[]):
            return build().to("meta")
