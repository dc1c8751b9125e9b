"""The one helper the registries share (backbones, strategies, fit extensions, evaluation hooks)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType


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
