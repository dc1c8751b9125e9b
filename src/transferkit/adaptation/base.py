"""Domain-adaptation methods as a registry (like strategies): ``--adapt NAME`` picks a registered method.

A method is a small class registered with ``@register_adaptation`` in a module listed in ``_MODULES``: its
``name``, the input it ``needs`` (``target_data``, ``target_labelled`` or ``pairs``), which backbones it works
with (``trained``: a strategy that trains the backbone through the engine; ``frozen``: frozen features; ``any``),
``supports(strategy, task_kind)`` for anything finer, and ``train(strategy, model, context, target)``, which
trains on a ``dataclasses.replace``d context (extra objectives, auxiliary target data, a feature transform or
example weights) and returns the TrainResult. :mod:`transferkit.adaptation.extension` runs the chosen method
after the source-only baseline.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from transferkit.errors import TransferkitError
from transferkit.registry import Registry

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import torch

    from transferkit.adaptation.extension import AdaptationConfig
    from transferkit.config import FitConfig
    from transferkit.data.base import LabeledData
    from transferkit.engine.context import RunContext
    from transferkit.engine.objectives import Objective
    from transferkit.engine.trainer import TrainResult
    from transferkit.model import TransferModel
    from transferkit.strategies.base import Strategy

_MODULES = [
    "transferkit.adaptation.dann",
    "transferkit.adaptation.coral",
    "transferkit.adaptation.importance",
    "transferkit.adaptation.feature_augmentation",
    "transferkit.adaptation.feature_matching",
]
INPUTS = ("target_data", "target_labelled", "pairs")
BACKBONES = ("trained", "frozen", "any")


class AdaptationMethod:
    """One ``--adapt`` method. ``summary`` collects entries for metrics.json's ``adaptation``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: the input the method needs, and the only one it accepts (one of INPUTS)
    needs: ClassVar[str] = "target_data"
    #: trained / frozen / any (see the module docstring)
    backbone: ClassVar[str] = "any"

    def __init__(self, config: AdaptationConfig, fit: FitConfig | None = None) -> None:
        self.config = config
        self.fit = fit
        self.summary: dict[str, Any] = {}

    def supports(self, strategy: Strategy, task_kind: str) -> bool | str:
        """True when the method takes effect with ``strategy`` on ``task_kind``, else the reason."""
        if task_kind != "label":
            return "domain adaptation adapts the label classifier (and scores its source-only baseline)"
        if self.backbone == "trained" and strategy.frozen_backbone:
            return f"it keeps the backbone frozen, and {self.name} aligns features by training it"
        if self.backbone == "trained" and not strategy.trains_with_engine():
            return f"it trains with its own loss, so the {self.name} loss would never be added"
        if self.backbone == "frozen" and not strategy.frozen_backbone:
            return f"it trains the backbone, and {self.name} works on frozen features (use --strategy linear-probe)"
        return True

    def train(self, strategy: Strategy, model: TransferModel, context: RunContext,
              target: LabeledData | None) -> TrainResult:
        raise NotImplementedError


class FeatureAlignment(AdaptationMethod):
    """A loss on (source batch, target batch) features added to the engine's (DANN, Deep CORAL); epochs are
    selected without target labels (``--adapt-selection``)."""

    backbone = "trained"

    def objective(self, model: TransferModel) -> Objective:
        raise NotImplementedError

    def train(self, strategy: Strategy, model: TransferModel, context: RunContext,
              target: LabeledData | None) -> TrainResult:
        from transferkit.adaptation.selection import label_free_selection

        assert target is not None
        aligned = replace(context, objectives=[*context.objectives, self.objective(model)],
                          aux_data={**context.aux_data, "target": target})
        self.summary["selection"] = self.config.adapt_selection
        return strategy.train(model, label_free_selection(aligned, model, target, self.config.adapt_selection))


def fit_head_in_closed_form(model: TransferModel, context: RunContext,
                            solve: Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
                            ) -> TrainResult:
    """Fit the first head in closed form (``solve(x, y) -> (W, b)``) on cached source features; validation
    metrics on source val."""
    import torch

    from transferkit.engine.trainer import TrainResult
    from transferkit.strategies.linear_probe import set_linear_head

    started = time.perf_counter()
    train, val = context.splits.train, context.splits.val
    x = context.features(model.backbone, train)
    keep = train.labels >= 0
    weight, bias = solve(x[keep], train.labels[keep])
    set_linear_head(model, weight, bias)
    row: dict[str, Any] = {"epoch": 1, "solver": "lbfgs"}
    if len(val):
        logits = torch.as_tensor(context.features(model.backbone, val)) @ weight.T + bias
        row["val_accuracy"] = float((logits.argmax(-1) == torch.as_tensor(val.labels)).float().mean())
    row["seconds"] = round(time.perf_counter() - started, 3)
    return TrainResult([row], 1, row.get("val_accuracy"), False, time.perf_counter() - started)


_REGISTRY = Registry("adaptation method", _MODULES)


def register_adaptation(cls: type[AdaptationMethod]) -> type[AdaptationMethod]:
    if cls.needs not in INPUTS or cls.backbone not in BACKBONES:
        raise ValueError(f"adaptation method '{cls.name}': needs one of {INPUTS}, backbone one of {BACKBONES}")
    return _REGISTRY.add(cls.name, cls)


def list_adaptations() -> dict[str, type[AdaptationMethod]]:
    return dict(_REGISTRY.load())


def adaptation_class(name: str) -> type[AdaptationMethod]:
    methods = list_adaptations()
    if name not in methods:
        raise TransferkitError(f"unknown --adapt '{name}'", f"choose one of: {', '.join(methods)}")
    return methods[name]
