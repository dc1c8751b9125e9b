"""Evaluation hooks: extra measurements that ``transferkit evaluate`` adds to its report.

A hook module defines ``add_arguments(parser)`` (its CLI flags for ``evaluate``) and
``evaluate_hook(model, data, report, options) -> dict`` (entries merged into the report; return ``{}`` when
the hook's options are not set). Examples: calibration, adversarial robustness, source-only baselines of
domain-adapted runs. Register a module by adding it to ``HOOK_MODULES``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from transferkit.registry import import_registering_modules

HOOK_MODULES = [
    "transferkit.evaluation.calibration",
    "transferkit.evaluation.attacks",
    "transferkit.adaptation.evaluation",
    "transferkit.tasks.extension",  # every task's metrics of a multi-task model
]


def hook_modules(names: list[str] | None = None) -> list[ModuleType]:
    """The hook modules, in order; a module listed twice is an error (its entries would be added twice)."""
    names = HOOK_MODULES if names is None else names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"evaluation hook {twice[0]} is registered twice")
    return import_registering_modules(names)


def add_hook_arguments(parser: Any) -> None:
    for module in hook_modules():
        module.add_arguments(parser)


def run_evaluation_hooks(model: Any, data: Any, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for module in hook_modules():
        extra.update(module.evaluate_hook(model, data, report, options))
    return extra
