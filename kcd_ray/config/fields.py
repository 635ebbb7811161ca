"""How a config field describes itself (``_f``), and sections that registered parts extend (``OpenSection``)."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import field
from typing import Any, ClassVar, Optional


def _f(default=dataclasses.MISSING, *, factory=None, choices=None, ge=None, gt=None, le=None, lt=None, help=""):
    """A config field: its default, allowed choices (a tuple, or the name of a registry in
    ``kcd_ray.registry.REGISTRIES``), numeric bounds and the help line ``kcd-ray config --list`` shows."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def registered_sections(registry: str) -> dict[str, type]:
    """``{name: config dataclass}`` of the parts of registry ``registry`` that declare a ``config_class``."""
    from kcd_ray.registry import REGISTRIES

    module, attr = REGISTRIES[registry].split(":")
    reg = getattr(importlib.import_module(module), attr)
    out = {}
    for name, part in reg.items():
        cls = getattr(part, "config_class", None)
        if cls is not None:
            out[name] = cls
    return out


class OpenSection:
    """A config section that registered parts extend without editing it: every part of the registry named by
    ``parts`` that declares ``config_class`` (a dataclass of ``_f`` fields) gets the sub-section
    ``<section>.<part name>``. Values live in ``extensions`` (filled with every registered part's defaults) and
    read as attributes: ``cfg.selection.infobatch.ratio``. ``kcd_ray.config.to_dict`` writes them at the
    section's level, so the YAML layout is that of an ordinary nested section."""

    parts: ClassVar[str] = ""

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields
        if name.startswith("__") or name == "extensions":
            raise AttributeError(name)
        ext = self.__dict__.get("extensions")
        if ext is not None and name in ext:
            return ext[name]
        cls = registered_sections(self.parts).get(name)
        if cls is None:
            raise AttributeError(f"{type(self).__name__} has no field or registered section {name!r}")
        return cls()  # a part registered after this config was built: its defaults


def default_extensions(registry: str) -> dict:
    return {name: cls() for name, cls in registered_sections(registry).items()}


def extensions_field(registry: str):
    return field(default_factory=lambda: default_extensions(registry), repr=False, compare=True,
                 metadata={"extensions": registry, "help": ""})


def is_extensions(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("extensions"))


def extension_class(section: Any, name: str) -> Optional[type]:
    """The config dataclass of ``<section>.<name>`` when ``section`` (an OpenSection class or instance) has it."""
    parts = getattr(section, "parts", "")
    return registered_sections(parts).get(name) if parts else None
