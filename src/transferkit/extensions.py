"""Fit extensions: option sets that add objectives or data to a run without touching strategies or the engine.

Regularisers (``--anchor kl``), domain adaptation (``--adapt dann``) and extra tasks are extensions: each has
an options dataclass (its fields become CLI flags) and a ``configure`` hook that returns the RunContext the run
trains with (``dataclasses.replace``d: objectives, auxiliary data, transformed splits or features), plus notes.
Register one with ``@register_extension`` in a module listed in ``_MODULES``.

No option is silently ignored: every active extension says which strategies and task kinds it works with
(:meth:`FitExtension.supports`), as every strategy says which task kinds it trains (``Strategy.supports``);
:func:`check_supported` refuses any other combination before anything is loaded or written, in one line that
names both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from transferkit.errors import TransferkitError
from transferkit.registry import Registry

if TYPE_CHECKING:
    from pathlib import Path

    from transferkit.config import FitConfig
    from transferkit.engine.context import RunContext
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

_MODULES = [
    "transferkit.strategies.regularizers",
    "transferkit.adaptation.extension",
    "transferkit.tasks.extension",
    "transferkit.evaluation.calibration",
    "transferkit.evaluation.datacheck",
    "transferkit.tracking",
    "transferkit.selftaught.semi",
]

#: Option values that name an input file or folder in :meth:`FitExtension.modes` (filled in by whoever runs them).
NEEDS_PATH = "<path>"


@dataclass
class ExtensionConfig:
    def validate(self) -> None: ...


class FitExtension:
    name: ClassVar[str] = ""
    config_class: ClassVar[type[ExtensionConfig]] = ExtensionConfig

    def __init__(self, config: ExtensionConfig) -> None:
        self.config = config

    def active(self) -> bool:
        return False

    def describe(self) -> str:
        """The flags that switched this extension on, as the user wrote them (e.g. ``--adapt dann``)."""
        return f"--{self.name}"

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        """Each way of switching the extension on: ``{label: options}`` (values :data:`NEEDS_PATH` name an input
        file). The support-matrix test runs every mode with every strategy and task kind."""
        return {}

    def supports(self, strategy: Strategy, task_kind: str) -> bool | str:
        """True when this (active) extension takes effect in a run of ``strategy`` on ``task_kind`` (one of
        :data:`transferkit.tasks.RUN_TASK_KINDS`), otherwise the reason, one phrase. Default: every strategy and
        task kind except ``causal_lm``, whose run trains the language model alone (no extension hook runs)."""
        if task_kind == "causal_lm":
            return "a --task causal-lm run trains the language model alone and applies no fit extension"
        return True

    def check(self, fit: FitConfig, strategy: Strategy) -> None:
        """Reject invalid options with a TransferkitError (called before any work, after :meth:`supports`)."""

    def configure(self, context: RunContext, model: TransferModel, fit: FitConfig) -> RunContext:
        """The context the run trains with: ``context`` itself, or a ``dataclasses.replace``d copy with more
        objectives / auxiliary data / transformed splits (never patched in place). May set up ``model``."""
        return context

    def train(self, context: RunContext, model: TransferModel, strategy: Strategy) -> TrainResult | None:
        """Take over training (e.g. train a baseline first, then call ``strategy.train`` on an adapted context);
        ``None`` (the default) leaves it to ``strategy.train``. At most one active extension may take over."""
        return None

    def metrics(self, context: RunContext, model: TransferModel) -> dict[str, Any]:
        """Extra entries for metrics.json after training."""
        return {}

    def published(self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Called once the run folder is in place (e.g. to log it to an experiment tracker)."""


_REGISTRY = Registry("fit extension", _MODULES)


def register_extension(cls: type[FitExtension]) -> type[FitExtension]:
    return _REGISTRY.add(cls.name, cls)


def list_extensions() -> dict[str, type[FitExtension]]:
    return dict(_REGISTRY.load())


#: run options that only act on a head trained by the engine's loss (closed-form and own-loop strategies ignore them)
ENGINE_LOSS_OPTIONS = ("label_smoothing", "head_dropout")


def check_supported(strategy: Strategy, extensions: list[FitExtension], task_kind: str, task_flags: str,
                    fit: FitConfig | None = None) -> None:
    """Refuse a run whose strategy cannot train ``task_kind``, ignores one of its ``fit`` options, or with which
    one of the active ``extensions`` would not take effect; ``task_flags`` is how the run asked for the task."""
    reason = strategy.supports(task_kind)
    if reason is not True:
        raise TransferkitError(f"--strategy {strategy.name} cannot train {task_flags}: {reason}",
                               "choose another strategy or task (see `transferkit fit --help`)")
    ignored = [name for name in ENGINE_LOSS_OPTIONS if fit is not None and getattr(fit, name)]
    if ignored and not strategy.trains_with_engine():
        flag = "--" + ignored[0].replace("_", "-")
        raise TransferkitError(f"{flag} does not work with --strategy {strategy.name}: it fits its head without the "
                               "engine's loss, so the option would be ignored",
                               f"drop {flag} or use a strategy trained by the engine (e.g. finetune)")
    for extension in extensions:
        reason = extension.supports(strategy, task_kind)
        if reason is not True:
            where = f"--strategy {strategy.name}" + ("" if task_kind == "label" else f" and {task_flags}")
            raise TransferkitError(f"{extension.describe()} does not work with {where}: {reason}",
                                   f"drop {extension.describe()} or change the strategy / task")
