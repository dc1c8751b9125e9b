"""Fit extensions: option sets that add objectives or data to a run without touching strategies or the engine.

Regularisers (``--anchor kl``), domain adaptation (``--adapt dann``) and extra tasks are extensions: each has
an options dataclass (its fields become CLI flags) and a ``configure`` hook that edits the RunContext (adds
objectives, auxiliary data, notes) before training. Register one by adding its module to ``_MODULES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from transferkit.registry import import_registering_modules

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
]


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

    def check(self, fit: FitConfig, strategy: Strategy) -> None:
        """Reject invalid combinations with a TransferkitError (called before any work)."""

    def configure(self, context: RunContext, model: TransferModel, fit: FitConfig) -> None:
        """Add objectives / auxiliary data / notes to the run."""

    def train(self, context: RunContext, model: TransferModel, strategy: Strategy) -> TrainResult | None:
        """Take over training (e.g. train a baseline first, then call ``strategy.train`` on an adapted context);
        ``None`` (the default) leaves it to ``strategy.train``. At most one active extension may take over."""
        return None

    def metrics(self, context: RunContext, model: TransferModel) -> dict[str, Any]:
        """Extra entries for metrics.json after training."""
        return {}

    def published(self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Called once the run folder is in place (e.g. to log it to an experiment tracker)."""


_REGISTRY: dict[str, type[FitExtension]] = {}
_loaded = False


def register_extension(cls: type[FitExtension]) -> type[FitExtension]:
    _REGISTRY[cls.name] = cls
    return cls


def list_extensions() -> dict[str, type[FitExtension]]:
    global _loaded
    if not _loaded:
        import_registering_modules(_MODULES)
        _loaded = True
    return dict(_REGISTRY)
