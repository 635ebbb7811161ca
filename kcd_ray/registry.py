"""A tiny name -> factory registry shared by models, distillers, datasets, value functions and schedules."""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown names fail with the list of known ones. ``aliases``: names a config may
    use that a caller resolves itself (e.g. ``selection.strategy=auto``); listed by ``names()``, never ``get()``."""

    def __init__(self, kind: str, aliases: tuple[str, ...] = ()):
        self.kind = kind
        self.aliases = tuple(aliases)
        self._items: Dict[str, T] = {}
        # Names outside the registered ones that are still valid (models: torchvision/<name>, pkg.mod:fn), and
        # what to say about them when a name is refused; see ``open_to``.
        self._accepts: Optional[Callable[[str], bool]] = None
        self.hint = ""

    def open_to(self, accepts: Callable[[str], bool], hint: str) -> None:
        """Also accept names for which ``accepts(name)`` is true (resolved later, by whoever builds them)."""
        self._accepts, self.hint = accepts, hint

    def accepts(self, name: str) -> bool:
        return name in self or (self._accepts is not None and self._accepts(name))

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or obj.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def unregister(self, name: str) -> T:
        """Remove ``name`` (a test's temporary part); KeyError when it is not registered."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items) + [a for a in self.aliases if a not in self._items]

    def items(self) -> list[tuple[str, T]]:
        """(name, registered object) pairs, aliases left out."""
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# Where each registry that a config field names lives, as "module:attribute". Looked up by name so that
# kcd_ray.config (which every package imports) imports none of them: no import cycle, and loading a config
# needs torch only when a registry name is checked.
REGISTRIES = {
    "models": "kcd_ray.models:MODELS",
    "datasets": "kcd_ray.data:DATASETS",
    "distillers": "kcd_ray.distill:DISTILLERS",
    "temperatures": "kcd_ray.distill.temperature:TEMPERATURES",
    "value_fns": "kcd_ray.condense.values:VALUE_FNS",
    "strategies": "kcd_ray.engine.selection:STRATEGIES",
    "curricula": "kcd_ray.engine.curriculum:CURRICULA",
}


def _registry(kind: str) -> Registry:
    module, attr = REGISTRIES[kind].split(":")
    return getattr(importlib.import_module(module), attr)


def registry_names(kind: str) -> list[str]:
    """Registered names of the registry ``kind`` (a key of ``REGISTRIES``)."""
    return _registry(kind).names()


def registry_accepts(kind: str, name: str) -> tuple[bool, str]:
    """Whether ``name`` is valid for registry ``kind`` (registered, or of a form it is open to), and its hint."""
    reg = _registry(kind)
    return reg.accepts(name), reg.hint
