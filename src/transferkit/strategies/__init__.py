"""Strategy registry: ``create_strategy("finetune", {"unfreeze": "2"})``.

Adding a method = one module with a ``StrategyConfig`` dataclass and a ``Strategy`` subclass decorated with
``@register_strategy``, plus its name in ``_STRATEGY_MODULES``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.registry import Registry
from transferkit.strategies.base import Strategy, StrategyConfig, freeze, unfreeze

__all__ = ["Strategy", "StrategyConfig", "create_strategy", "list_strategies", "register_strategy", "freeze",
           "unfreeze", "strategy_class"]

_STRATEGY_MODULES = [
    "transferkit.strategies.linear_probe",
    "transferkit.strategies.finetune",
    "transferkit.strategies.lora",
    "transferkit.strategies.adapters",
    "transferkit.strategies.fish",
    "transferkit.strategies.fewshot",
]

_REGISTRY = Registry("strategy", _STRATEGY_MODULES)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    return _REGISTRY.add(cls.name, cls)


def list_strategies() -> dict[str, type[Strategy]]:
    return dict(_REGISTRY.load())


def strategy_class(name: str) -> type[Strategy]:
    _REGISTRY.load()
    if name not in _REGISTRY:
        raise TransferkitError(f"unknown strategy '{name}'", f"choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create_strategy(name: str, options: dict[str, Any] | None = None) -> Strategy:
    """Build a strategy from its name and a dict of options (unknown options are an error)."""
    cls = strategy_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    options = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = ", ".join(f"--{f.replace('_', '-')}" for f in fields) or "none"
        raise TransferkitError(f"strategy '{name}' has no option {', '.join(unknown)}", f"its options are: {known}")
    return cls(cls.config_class(**options))
