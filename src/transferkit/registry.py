"""The helpers the registries share (backbones, strategies, fit extensions, adaptation methods, evaluation hooks)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")


def import_registering_modules(names: Iterable[str]) -> list[ModuleType]:
    """Import each module whose import registers entries; a module that does not exist is skipped (so one
    missing optional module does not break the others), an import error inside a module is raised."""
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return modules


def _origin(entry: Any) -> str:
    """Where an entry was defined (``module.qualname``): the same class or function re-registered (a module
    imported twice, e.g. reloaded) is not a duplicate."""
    entry = getattr(entry, "factory", entry)
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', repr(entry))}"


def add_entry(registry: dict[str, T], name: str, entry: T, kind: str) -> T:
    """Put ``entry`` under ``name`` in ``registry``; a different entry under a name already taken is an error
    (two plugins must never shadow each other silently)."""
    if not name:
        raise ValueError(f"{kind} {_origin(entry)} has no name")
    if name in registry and _origin(registry[name]) != _origin(entry):
        raise ValueError(f"{kind} '{name}' is registered twice: by {_origin(registry[name])} and {_origin(entry)}")
    registry[name] = entry
    return entry


class Registry(dict):
    """Entries by name, filled by importing the registering ``modules`` on first read (:meth:`load`); a different
    entry under a taken name is refused (:func:`add_entry`). One class for the strategy, fit-extension and
    adaptation registries, so each keeps only its own checks."""

    def __init__(self, kind: str, modules: Iterable[str]) -> None:
        super().__init__()
        self.kind = kind
        self.modules = list(modules)
        self._loaded = False

    def add(self, name: str, entry: T) -> T:
        return add_entry(self, name, entry, self.kind)

    def load(self) -> Registry:
        """The registry after every registering module was imported (once)."""
        if not self._loaded:
            import_registering_modules(self.modules)
            self._loaded = True
        return self
