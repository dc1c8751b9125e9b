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


def set_hook_flags(options: dict[str, Any]) -> list[str]:
    """The hook flags that ``options`` (``evaluate``'s keyword options, or its parsed CLI arguments) set away from
    their defaults, e.g. ``["--attack", "--epsilon"]``; a flag of a ``store_true`` / ``store_false`` pair is the
    one whose value was given (``--no-source-only``)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    add_hook_arguments(parser)
    flags: dict[str, str] = {}
    for action in parser._actions:
        value = options.get(action.dest, action.default)
        if action.dest not in flags and value != action.default and (action.const is None or action.const == value):
            flags[action.dest] = action.option_strings[0]
    return list(flags.values())


def run_evaluation_hooks(model: Any, data: Any, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for module in hook_modules():
        extra.update(module.evaluate_hook(model, data, report, options))
    return extra
