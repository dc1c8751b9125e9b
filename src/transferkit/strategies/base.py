"""Strategies decide *which* parameters of a TransferModel adapt, and how (PEFT-style: a config dataclass whose
``field(metadata={"help": ...})`` documents each option, plus a small class registered by name).

A strategy has three hooks:
  * ``prepare(model)``: structural changes and ``requires_grad`` flags. Deterministic given the config, because
    loading a saved model replays it before loading the weights.
  * ``param_groups(model, train)``: optimiser groups with their learning rates.
  * ``train(model, context)``: how to fit; the default runs the one engine on the training data with the
    context's objectives. Strategies override it only to add a stage (e.g. a linear probe before fine-tuning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

if TYPE_CHECKING:
    from transferkit.engine.context import RunContext
    from transferkit.engine.objectives import Objective
    from transferkit.engine.trainer import TrainConfig, TrainResult
    from transferkit.model import TransferModel


#: the training options (``TrainConfig``) that only steer the engine's optimiser; a strategy fitted in closed form
#: reads none of them
OPTIMISER_OPTIONS = ("epochs", "lr", "optimizer", "weight_decay", "momentum", "schedule", "warmup_steps",
                     "plateau_patience", "noam_d_model", "early_stopping", "grad_clip")


@dataclass
class StrategyConfig:
    """Options of a strategy. Subclasses add fields with ``metadata={"help": ...}``."""

    def validate(self) -> None:
        """Raise TransferkitError for invalid values."""


class Strategy:
    name: ClassVar[str] = ""
    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    description: ClassVar[str] = ""
    #: True when the backbone stays frozen and unchanged, so features can be extracted once and cached.
    frozen_backbone: ClassVar[bool] = False
    #: the run task kinds (``transferkit.tasks.RUN_TASK_KINDS``) this strategy trains: ``label`` is the dataset's
    #: label alone; the others are the kind of the first ``--task`` (several heads, trained by the engine)
    task_kinds: ClassVar[tuple[str, ...]] = ("label", "classify", "regress", "quantile")

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        self.config.validate()

    def prepare(self, model: TransferModel, for_loading: bool = False) -> None:
        """Default: freeze the backbone, train the heads."""
        freeze(model.backbone)
        for p in model.heads.parameters():
            p.requires_grad_(True)

    def param_groups(self, model: TransferModel, train: TrainConfig) -> list[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": train.lr, "name": "trainable"}]

    def objectives(self, model: TransferModel) -> list[Objective]:
        """Extra loss terms the strategy itself needs (most need none)."""
        return []

    def train(self, model: TransferModel, context: RunContext) -> TrainResult:
        return context.train_with_engine(model, self)

    def trains_with_engine(self) -> bool:
        """True when training runs the engine with the context's task loss, objectives and auxiliary data, so
        regularisers, domain losses and example weights take effect; False for closed-form or own-loop fits."""
        return True

    def unused_train_options(self) -> tuple[tuple[str, ...], str]:
        """The training options (``TrainConfig`` fields) this strategy never reads, and why (one phrase naming
        what steers it instead), so that one set by the user is named in a warning rather than silently doing
        nothing (``fitting.warn_unused_train_options``). Default: none (the engine trains with all of them)."""
        return (), ""

    def supports(self, task_kind: str) -> bool | str:
        """True when this strategy trains runs of ``task_kind``, otherwise the reason (one phrase)."""
        if task_kind in self.task_kinds:
            return True
        if self.frozen_backbone:
            return "it fits only the label's head, on cached features"
        return f"it trains {', '.join(self.task_kinds)} runs only"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": asdict(self.config)}


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(True)
